#!/usr/bin/env bash
# FA Pool on GPUs over NCCL, next to the strategies it competes with, at the point of issue #15
# (paper model, bf16, 8K contexts, batch 16, synthetic KV) and its correctness in fp32 and bf16.
# Usage: bash jobs/fa_pool_gpu_check.sh OUT_DIR [GPUS]   (GPUS = 4: TP4 and FA Pool 2+2; 2: TP2 and 1+1)
#        RUNS="reference check_fp32 ..." limits it to the runs named (as they appear in records/).
set -uo pipefail
OUT=${1:?output directory}
GPUS=${2:-4}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1
run() {  # name, overrides...
  local name=$1; shift
  [ -z "${RUNS:-}" ] || [[ " $RUNS " == *" $name "* ]] || return 0
  python3 -m harness.app hydra.mode=RUN launcher.timeout_s=${RUN_TIMEOUT_S:-240} "$@" results_dir="$OUT/records/$name" hydra.run.dir="$OUT/hydra/$name" \
    > "$OUT/logs_$name.txt" 2>&1 || echo "$name failed (see logs_$name.txt)"
}
POINT="model=paper hardware=cuda attention_backend=sdpa workload=len8192 workload.batch_size=16 workload.output_tokens=16"
if [ "$GPUS" = 4 ]; then
  TP=tp4_pp1; FA="strategy=fa_pool_b2_p2"; FA_NAME=fa_pool_b2_p2
else
  TP=tp2_pp1; FA="strategy=fa_pool_b2_p2 strategy.tp=1 strategy.pool.size=1 strategy.pool.max_size=1"; FA_NAME=fa_pool_b1_p1
fi
POOL="strategy.pool.threshold=1024 strategy.pool.tokens_per_rank=4096"
run reference strategy=reference $POINT
run $TP strategy=$TP $POINT
run ${FA_NAME}_block256 $FA $POINT $POOL strategy.pool.block_size=256
run ${FA_NAME}_block16 $FA $POINT $POOL strategy.pool.block_size=16
run ${FA_NAME}_preset_block8 $FA $POINT
run ${FA_NAME}_block256_sync $FA $POINT $POOL strategy.pool.block_size=256 strategy.pool.async_overlap=false
# correctness over NCCL: the paper model on mixed lengths that cross the threshold, fp32 and bf16
CHECK="model=paper hardware=cuda workload=tiny_mixed check_reference=true model.init_std=0.3"
run check_fp32 $FA $CHECK hardware.dtype=float32
run check_bf16 $FA $CHECK
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = []
for f in sorted(Path(sys.argv[1], "records").rglob("result.json")):
    r = json.loads(f.read_text())
    m, c = r.get("metrics") or {}, r.get("reference_check") or {}
    rows.append(f"| {f.parent.name} | {r['status']} | {m.get('mean_tpot_ms', float('nan')):.2f} | {m.get('median_tpot_ms', float('nan')):.2f} | "
                f"{c.get('tokens_equal', '')} | {c.get('max_abs_logit_error', '')} | {r.get('error') or ''} |")
table = "| run | status | mean TPOT ms | median TPOT ms | tokens equal | max logit err | error |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
Path(sys.argv[1], "summary.md").write_text(table + "\n")
print(table)
PY
