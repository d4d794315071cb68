#!/usr/bin/env bash
# The one-GPU measured result set: the GPU tests, the GPU benchmark (harness/bench_gpu.py), and
# fapool-bench records of the reference strategy on the paper model at the paper's lengths.
# Usage: bash jobs/gpu_measure.sh OUT_DIR   (on a machine with one CUDA GPU; writes OUT_DIR/*)
set -uo pipefail
OUT=${1:?output directory}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1
python3 -m pytest -q tests/test_attention.py tests/test_gpu_path.py 2>&1 | tee "$OUT/gpu_tests.txt"
python3 -m harness.bench_gpu --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.log"
# records through the harness itself (eager steps with the LocalKV cache, synthetic KV), one per point
for point in "len2048 64" "len8192 32" "len16384 16" "len32768 8" "len8192 8" "len16384 32"; do
  set -- $point
  python3 -m harness.app hydra.mode=RUN strategy=reference model=paper hardware=cuda attention_backend=sdpa \
    workload=$1 workload.batch_size=$2 workload.output_tokens=16 results_dir="$OUT/records/$1_b$2" \
    hydra.run.dir="$OUT/hydra/$1_b$2" 2>&1 | tail -2
done
