"""CPU cost of the FA Pool's resource management and per-step plan, at the paper's scale, on one core.

    python -m harness.bench_plan [--steps 50] [--out DIR]

What every rank runs on the host before each decode step (fa_pool_plan.Scheduler: room for each pooled
sequence's next token in the block table, then the plan's index arrays and their one upload), timed per step
for a base rank and for a pool rank. Paper point: batch 1024, 16K context, pool 32, block 256, base TP8,
2 micro-batches, hierarchical reduction over nodes of 8; and the same with the paper's length buckets, where
sequences cross the threshold (admission into the pool) during the measured steps. Goal: <= 5 ms a step.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from harness.record import device_environment
from harness.workload import PAPER_BUCKETS
from model.parallel.block_table import BlockTable
from model.parallel.engine import micro_batches
from model.parallel.fa_pool_plan import Scheduler, Topology

PAPER = dict(batch=1024, tp=8, pool=32, block=256, threshold=4096, tokens_per_rank=4096, micro_batches=2, gpus_per_node=8)


def scheduler(lens: np.ndarray, out_tokens: int, me: int, p=PAPER) -> Scheduler:
    max_len = int(lens.max()) + out_tokens
    max_blocks = -(-max_len // p["block"])
    table = BlockTable(len(lens), p["pool"], p["pool"], p["block"], "proportional", p["tokens_per_rank"], me=me,
                       slots=len(lens) * max_blocks if me >= 0 else 0, max_blocks_per_seq=max_blocks)
    topo = Topology(p["tp"], p["pool"], p["gpus_per_node"], hierarchical=True)
    sched = Scheduler(lens, max_len, p["threshold"], table, topo, micro_batches(len(lens), p["micro_batches"]), me, "cpu")
    sched.admit(sched.long_now())
    return sched


def time_steps(lens: np.ndarray, steps: int, me: int) -> dict:
    sched = scheduler(lens, steps + 1, me)
    times, admitted = [], 0
    # each step changes the scheduler (lengths grow, sequences cross the threshold): every step is timed once, in
    # order, rather than one call repeated by a benchmark timer
    for _ in range(steps):
        t0 = time.perf_counter()
        crossing = sched.crossing()
        sched.admit(crossing)  # the engine then moves their KV: communication, not timed here
        sched.plan_step()
        sched.advance()
        times.append(time.perf_counter() - t0)
        admitted += len(crossing)
    times_ms = np.array(times) * 1e3
    return {"median_ms": float(np.median(times_ms)), "p95_ms": float(np.percentile(times_ms, 95)),
            "max_ms": float(times_ms.max()), "admitted": admitted,
            "pooled": int(sched.in_pool.sum())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    buckets = list(PAPER_BUCKETS.values())
    mixed = np.array([rng.integers(*buckets[i % len(buckets)]) for i in range(PAPER["batch"])])
    cases = {"16K context": np.full(PAPER["batch"], 16384), "paper buckets": mixed}
    rows = []
    for name, lens in cases.items():
        for role, me in (("base", -1), ("pool", 0)):
            rows.append({"case": name, "role": role, **PAPER, **time_steps(lens, args.steps, me)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        machine = {**device_environment("cpu"), "cpu": platform.processor() or platform.machine(),
                   "numpy": np.__version__, "threads": torch.get_num_threads()}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "bench_plan.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
