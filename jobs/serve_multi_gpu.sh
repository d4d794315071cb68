#!/usr/bin/env bash
# Serving on 2 or 4 GPUs of one host (one device call): every strategy at equal GPU counts replaying the Mooncake
# sample at a sweep of request rates, then the serving report and the virtual-time check of the same replays.
#   4 GPUs: tp4, tp2_pp2, dcp_t4_k2, FA Pool 2+2 and 1+3;   2 GPUs: tp2 and FA Pool 1+1
# Usage: bash jobs/serve_multi_gpu.sh OUT_DIR      (writes at most 8 files into OUT_DIR)
#   RATES (default 0.5,1,2,4,8), REQUESTS (default 32), LIMIT_S (seconds for the replays, default 480),
#   SMOKE=1: the tiny model on 4 CPU ranks over gloo (the same sweep, small), to try the job without GPUs.
set -uo pipefail
OUT=${1:?output directory}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
if [ -n "${SMOKE:-}" ]; then
  GPUS=4
  COMMON="model=tiny hardware=cpu workload=tiny_mooncake workload.trace.first_n=${REQUESTS:-8} check_reference=true"
  POOL="strategy.pool.threshold=120 strategy.pool.tokens_per_rank=64 strategy.pool.gpus_per_node=4"
  RATES=${RATES:-4,16}
else
  GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import json; from harness.record import device_environment; print(json.dumps(device_environment('cuda')))"
  } > "$OUT/versions.txt" 2>&1
  COMMON="model=paper hardware=cuda attention_backend=sdpa workload=mooncake_conversation workload.trace.first_n=${REQUESTS:-32}
          serving.max_batch=64 serving.token_budget=2112 serving.prefill_chunk=2048 serving.block_size=64 check_reference=false"
  POOL="strategy.pool.threshold=4096 strategy.pool.tokens_per_rank=4096 strategy.pool.block_size=64 strategy.pool.gpus_per_node=$GPUS"
  RATES=${RATES:-0.5,1,2,4,8}
fi
if (( GPUS >= 4 )); then
  RUNS=("static strategy=tp4_pp1,tp2_pp2,dcp_t4_k2"
        "pool22 strategy=fa_pool_b2_p2 $POOL"
        "pool13 strategy=fa_pool_b2_p2 strategy.name=fa_pool_b1_p3 strategy.tp=1 strategy.pool.size=3 strategy.pool.max_size=3 $POOL")
elif (( GPUS >= 2 )); then
  RUNS=("static strategy=tp2_pp1"
        "pool11 strategy=fa_pool_b2_p2 strategy.name=fa_pool_b1_p1 strategy.tp=1 strategy.pool.size=1 strategy.pool.max_size=1 $POOL")
else
  echo "needs 2 or 4 GPUs, this machine has $GPUS"; exit 1
fi
end=$((SECONDS + ${LIMIT_S:-480}))
for run in "${RUNS[@]}"; do
  set -- $run; name=$1; shift
  left=$((end - SECONDS)); (( left > 30 )) || { echo "out of time before $name"; break; }
  timeout $left python3 -m harness.app -m $COMMON "$@" "workload.trace.rate=$RATES" fail_on_error=false \
    hydra.sweep.dir="$WORK/records/$name" > "$WORK/$name.log" 2>&1 || echo "$name: stopped (see $name.log in logs.tar.gz)"
done
python3 -m harness.report "$WORK/records" --out "$WORK/report" > /dev/null 2>&1 && cp "$WORK/report/serving.md" "$OUT"/
python3 -m harness.perfmodel --serving "$WORK/records" > "$OUT/perfmodel_serving.md" 2>&1
tar czf "$OUT/records.tar.gz" -C "$WORK" records --exclude='*.png' --exclude='*.pdf' --exclude='results.parquet' 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls *.log) 2>/dev/null
cat "$OUT/serving.md" 2>/dev/null | cut -c1-400
