# one process per variant; PROBE_VARIANT names the patch in probe/sitecustomize.py
export PYTHONPATH=$PWD/probe:$PYTHONPATH
for v in g2 g1 g2_eager_send g2_sync_all g2_no_graphs; do
  case $v in g2_eager_send) p=eager_send;; g2_sync_all) p=sync_all;; *) p=;; esac
  PROBE_VARIANT=$p timeout 90 python3 probe/diag.py $v 2>&1 | grep -E "^g[12]" | cut -c1-400
done
