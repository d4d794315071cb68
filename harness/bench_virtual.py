"""Host cost of a trace replay in virtual time (launcher=model): CPU seconds against the number of requests.

    python -m harness.bench_virtual --trace PATH                      # tp8_pp2 at 8 req/s, 1,000 to all requests
    python -m harness.bench_virtual --trace PATH --strategy fa_pool --rate 4 --windows 500,2000

Each window (the trace's first N requests, re-timed to the rate) is replayed once by harness/serving/virtual.py on
experiment=paper_serving's configuration; the table gives its CPU seconds (time.process_time of this process, on
one thread), its steps, the CPU microseconds per step and per request, so that how the cost grows with the trace
is read off the last two columns. Goal (issue: the paper at scale in virtual time): the whole Mooncake
conversation trace for one configuration in under a minute on one core. Run it on an idle core: it times the host.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from harness.bench_serving import config
from harness.serving.virtual import virtual_replay
from harness.traces import load_trace


def replay_cost(overrides: list[str]) -> dict:
    """One virtual replay of the config these overrides compose: CPU seconds, steps, requests."""
    cfg, _ = config(overrides)
    requests = len(load_trace(cfg.workload.trace).arrival_s)
    start = time.process_time()
    replay = virtual_replay(cfg)
    cpu_s = time.process_time() - start
    return {"requests": requests, "steps": int(replay.scheduler.steps), "CPU s": cpu_s,
            "CPU us/step": cpu_s / max(replay.scheduler.steps, 1) * 1e6, "CPU ms/request": cpu_s / requests * 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True, help="a Mooncake JSONL trace (the full one: ../shared/traces/...)")
    ap.add_argument("--strategy", default="tp8_pp2")
    ap.add_argument("--rate", type=float, default=8.0, help="requests per second the trace is re-timed to")
    ap.add_argument("--windows", default="1000,3000,6000,0", help="first N requests, comma-separated; 0 = all")
    ap.add_argument("overrides", nargs="*", help="more config overrides (key=value)")
    args = ap.parse_args(argv)
    trace = Path(args.trace)
    if not trace.is_file():
        raise SystemExit(f"--trace {trace}: no such file (the full trace is ../shared/traces/mooncake_conversation_trace.jsonl)")
    torch.set_num_threads(1)

    def overrides(n):
        return ["experiment=paper_serving", f"strategy={args.strategy}", f"workload.trace.path={trace.resolve()}",
                f"workload.trace.rate={args.rate}", f"workload.trace.first_n={n}", *args.overrides]

    replay_cost(overrides(50))  # untimed: imports and first calls
    rows = [{"window": str(n or "all"), **replay_cost(overrides(n))} for n in (int(w) for w in args.windows.split(","))]
    print(f"{args.strategy}, offered {args.rate:g} req/s, virtual time (launcher=model)\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=",.3g", intfmt=","))


if __name__ == "__main__":
    main()
