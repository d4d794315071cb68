#!/usr/bin/env bash
# The paged decode-attention kernel on one GPU: its GPU tests (bf16 against the math reference) and its
# benchmark against the read bandwidth and dense cuDNN (harness/bench_paged.py), then its work plans on
# mixed-length batches (--ragged: ragged.md).
# Usage: bash jobs/paged_measure.sh OUT_DIR [--sweep]   (on a machine with one CUDA GPU; writes OUT_DIR/*)
set -uo pipefail
OUT=${1:?output directory}
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_paged_attention.py 2>&1 | tee "$OUT/gpu_tests.txt"
python3 -m harness.bench_paged --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_paged.log"
python3 -m pytest -q -p no:cacheprovider tests/test_paged_ragged.py 2>&1 | tee "$OUT/gpu_tests_ragged.txt"
python3 -m harness.bench_paged --ragged --out "$OUT" 2>&1 | tee "$OUT/bench_ragged.log"
