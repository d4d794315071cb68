"""Host cost of the serving scheduler: milliseconds per step (plan + completion) with W requests waiting and R running.

    python -m harness.bench_scheduler            # the grid, as a Markdown table, and the goal's point
    python -m harness.bench_scheduler --steps 500

Every running request is decoding (long outputs), the queue cannot be admitted (the batch is full), so each step
does what a loaded server's step does: a decode token per running request, a block where one fills up, the queue
looked at. Goal (issue: serving mode): at most 1 ms per step at 1,000 waiting and 256 running on one core, flat in
the waiting count. Run it on an idle core: it times the host.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from harness.config import ServingConfig
from harness.serving.scheduler import Scheduler
from harness.traces import Requests


def loaded_scheduler(waiting: int, running: int, block_size: int = 16) -> Scheduler:
    n = waiting + running
    reqs = Requests(np.zeros(n), np.full(n, 64, dtype=np.int64), np.full(n, 100_000, dtype=np.int64), np.arange(n))
    cfg = ServingConfig(max_batch=running, token_budget=max(running, 64) * 2, block_size=block_size)
    width = -(-(64 + 100_000) // block_size)
    sched = Scheduler(reqs, cfg, running * width, width, lambda r: np.zeros(64, dtype=np.int64))
    now = 0.0
    while sched.running < running or any(sched.ctx[sched.slot_req >= 0] < 64):  # admit and prefill everyone
        plan = sched.begin(now, now, stamp_arrivals=True)
        sched.complete(plan, np.zeros(plan.rows, dtype=np.int64), now)
        now += 1.0
    return sched


def ms_per_step(waiting: int, running: int, steps: int) -> float:
    sched = loaded_scheduler(waiting, running)
    assert len(sched.waiting) == waiting and sched.running == running
    times = []
    now = 1e6
    # each step moves the batch on (tokens, blocks): every step is timed once, in order, rather than one call
    # repeated by a benchmark timer
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = sched.begin(now, now, stamp_arrivals=True)
        sched.complete(plan, np.zeros(plan.rows, dtype=np.int64), now)
        times.append(time.perf_counter() - t0)
        now += 1.0
    return float(np.median(times)) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for running in (16, 64, 256):
        for waiting in (0, 100, 1000, 10_000):
            rows.append({"running": running, "waiting": waiting, "ms/step (median)": ms_per_step(waiting, running, args.steps)})
    t = pd.DataFrame(rows)
    base = t[t.waiting == 0].set_index("running")["ms/step (median)"]
    t["vs 0 waiting"] = [r["ms/step (median)"] / base[r["running"]] for _, r in t.iterrows()]
    print(t.astype({"running": str, "waiting": str}).to_markdown(index=False, floatfmt=".3g"))
    goal = t[(t.running == 256) & (t.waiting == 1000)]["ms/step (median)"].item()
    print(f"\n1,000 waiting, 256 running: {goal:.3f} ms per step (goal: <= 1 ms on one core)")


if __name__ == "__main__":
    main()
