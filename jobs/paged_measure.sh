#!/usr/bin/env bash
# The paged decode-attention kernels on one GPU: their tests (Triton's split and ragged plans and cuDNN's paged SDPA,
# bf16 against the math reference, CUDA graph replays included), then harness/bench_paged.py: the uniform batches
# against the read bandwidth and dense cuDNN (paged.md), the mixed-length batches (--ragged: ragged.md) and a whole
# serving step's KV (--step: step.md; skipped, with its reason, where the GPU lacks the memory).
# Usage: bash jobs/paged_measure.sh OUT_DIR [--sweep]   (on a machine with one CUDA GPU)
# The caller installs the cuDNN frontend first (pip install nvidia-cudnn-frontend==1.16.0, or a carried wheel of it);
# without it the cuDNN tests skip and the cuDNN columns give the reason. The full Mooncake trace is read from
# .traces/mooncake_conversation_trace.jsonl where it was carried, else the committed 300-request sample.
# STEP_GB (default 100) sizes the step's KV over its 4 layers.
# Writes 7 files: run.log (the GPU, the tests' and the benchmarks' output), paged.{md,json}, ragged.{md,json},
# step.{md,json}.
set -uo pipefail
OUT=${1:?output directory}
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/run.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import cudnn; print('cudnn frontend', cudnn.__version__, 'libcudnn', cudnn.backend_version_string())" \
    || echo "the cuDNN frontend does not import: its tests skip"
} > "$LOG" 2>&1
python3 -m pytest -q -rs -p no:cacheprovider tests/test_paged_attention.py tests/test_paged_ragged.py \
  tests/test_paged_cudnn.py 2>&1 | tee -a "$LOG"
python3 -m harness.bench_paged --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
python3 -m harness.bench_paged --ragged --out "$OUT" 2>&1 | tee -a "$LOG"
python3 -m harness.bench_paged --step --step-gb "${STEP_GB:-100}" --out "$OUT" 2>&1 | tee -a "$LOG"
