#!/usr/bin/env bash
# Serving on one GPU (one device call): the GPU serving tests, then harness/bench_serving.py (the reference strategy
# on the paper model in bf16 replaying the Mooncake sample at several rates; steps timed alone; host time per step)
# and the serving report of its records.
# Usage: bash jobs/serve_gpu.sh OUT_DIR [bench_serving arguments...]   (writes at most 8 files into OUT_DIR)
set -uo pipefail
OUT=${1:?output directory}; shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import json; from harness.record import device_environment; print(json.dumps(device_environment('cuda')))"
} > "$OUT/versions.txt" 2>&1
[ -n "${SKIP_TESTS:-}" ] || timeout ${TEST_S:-150} python3 -m pytest -q -x ${TESTS:-tests/test_gpu_serving.py} > "$OUT/gpu_tests.txt" 2>&1 \
  || echo "GPU serving tests failed or timed out (see gpu_tests.txt)"
WORK=$(mktemp -d)
timeout ${BENCH_S:-360} python3 -m harness.bench_serving --out "$WORK" "$@" > "$OUT/bench_serving.log" 2>&1 \
  || echo "bench_serving failed or timed out (see bench_serving.log)"
cp "$WORK"/bench_serving.md "$WORK"/bench_serving.json "$OUT"/ 2>/dev/null
python3 -m harness.report "$WORK/records" --out "$WORK/report" > /dev/null 2>&1 && cp "$WORK/report/serving.md" "$OUT"/
tar czf "$OUT/records.tar.gz" -C "$WORK" records 2>/dev/null
tail -40 "$OUT/bench_serving.log"
