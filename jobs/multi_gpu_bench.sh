#!/usr/bin/env bash
# Every strategy on this machine's GPUs against its roofline (issue #16), in one device call.
# Usage: bash jobs/multi_gpu_bench.sh OUT_DIR [bench_multi arguments, e.g. --points 8192x16 --only reference,tp4]
#        SKIP="tests checks" leaves those parts out; TESTS="tests/test_x.py ..." narrows the GPU tests (split at
#        spaces), TESTS_K="not fa_pool and not profiled" selects among them (pytest -k, spaces kept).
#        BENCH_LIMIT=S stops the runs after S seconds and writes the tables from the records made by then, so that
#        a call cut by the device's time limit still brings its records back (tarred below).
# Writes OUT_DIR/{versions.txt, gpu_tests.txt, checks.md, bench_multi.md, bench_multi.json, limits.json, profile.md,
# records.tgz (records/, checks/ and logs/: every record and log), traces.tgz (with --trace)}: the device tool brings
# back 8 files.
set -uo pipefail
OUT=${1:?output directory}; shift
BENCH_ARGS=("$@")  # kept apart: the checks below reuse the positional parameters
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import json; from harness.record import device_environment; print(json.dumps(device_environment('cuda')))"
} > "$OUT/versions.txt" 2>&1
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
if ! skip tests; then  # the GPU side of the test suite: kernels and the graphed step against the plain model
  timeout 200 python3 -m pytest -q -x ${TESTS:-tests/test_paged_attention.py tests/test_gpu_path.py tests/test_gpu_strategies.py} \
    ${TESTS_K:+-k "$TESTS_K"} > "$OUT/gpu_tests.txt" 2>&1 || echo "GPU tests failed (see gpu_tests.txt)"
fi
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
if ! skip checks && (( GPUS < 4 )); then echo "checks skipped: they need 4 GPUs, this machine has $GPUS"
elif ! skip checks; then  # teacher-forced reference check over NCCL: paper model, mixed lengths
  # The default init: at the paper's width, init_std=0.3 amplifies fp32 rounding (any change of summation order,
  # TP's split GEMMs included) to 0.5-0.7 on logits of ~86, for tp2 as for FA Pool (results/measured/h200-x4/bench/
  # call_f/diagnosis.md). The sharp-init check runs on the tiny model in tests/test_gpu_strategies.py.
  mkdir -p "$OUT/checks"
  CHECK="model=paper hardware=cuda workload=tiny_mixed check_reference=true launcher.timeout_s=120"
  POOL="strategy.pool.gpus_per_node=4 strategy.pool.hierarchical=false"
  for s in "tp2_pp2 strategy=tp2_pp2" "tp1_pp4 strategy=tp1_pp2 strategy.pp=4 strategy.world_size=4 strategy.micro_batches=4" \
           "tp4 strategy=tp4_pp1" "fa_pool_b2_p2 strategy=fa_pool_b2_p2 $POOL"; do
    set -- $s; name=$1; shift
    for dtype in float32 bfloat16; do
      python3 -m harness.app hydra.mode=RUN $CHECK "$@" hardware.dtype=$dtype results_dir="$OUT/checks/${name}_$dtype" \
        hydra.run.dir="/tmp/hydra/check_${name}_$dtype" > "$OUT/checks/${name}_$dtype.log" 2>&1 || echo "check $name $dtype failed"
    done
  done
  python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = ["| check | status | passed | tokens equal (free-running) | max rel logit error | argmax flips (ref margin) |", "|---|---|---|---|---|---|"]
for f in sorted(Path(sys.argv[1], "checks").rglob("result.json")):
    r = json.loads(f.read_text()); c = r.get("reference_check") or {}
    flips = ", ".join(f"{x['ref_margin']:.3g}" for x in c.get("argmax_flips", []))
    rows.append(f"| {f.parent.name} | {r['status']} | {c.get('passed')} | {c.get('tokens_equal')} | {c.get('max_rel_logit_error')} | {flips} |")
Path(sys.argv[1], "checks.md").write_text("\n".join(rows) + "\n"); print("\n".join(rows))
PY
fi
timeout "${BENCH_LIMIT:-0}" python3 -m harness.bench_multi --out "$OUT" "${BENCH_ARGS[@]}" ||
  { echo "bench_multi stopped (rc $?): tables from the records made so far"; python3 -m harness.bench_multi --out "$OUT" --rebuild; }
# traces (--trace) apart: a 4-run call's traces came to 17 MB, over what the device tool brings back, and took the
# records with them
cd "$OUT" && { ls -d records/*/traces >/dev/null 2>&1 && tar czf traces.tgz records/*/traces; true; } &&
  tar czf records.tgz --exclude=traces $(ls -d records checks logs 2>/dev/null) && rm -rf records checks logs nccl_calibration.json
