"""What the benchmarks (harness/bench_*.py) share: timing a call, their command line, the versions line of a
device, and Markdown tables.

Timing (timeit): on a GPU, triton.testing.do_bench (CUDA events around each call, the L2 cache cleared before
each call, call counts from time budgets); on the CPU, or on a GPU without Triton, torch.utils.benchmark.Timer (one
call per measurement, the GPU synchronized around it). Both give the median of the timed calls. A collective must be
called as often on every rank, which time budgets do not promise: timeit_fixed makes exactly the calls it is asked
for. The engine's own step clock (harness/measure.StepClock) is neither: it measures steps inside a run, not a call
repeated alone.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable, Iterable, Optional

import pandas as pd
import torch
from torch.utils import benchmark


def timeit(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of one fn() call over at least `reps` timed calls, after `warmup` calls."""
    if torch.cuda.is_available():
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return _do_bench(do_bench, fn, reps, warmup)
    return _timer_median(fn, reps, warmup)


def timeit_fixed(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of one fn() call, with the same number of calls wherever it runs (a collective's ranks):
    on a GPU `warmup` untimed calls then `reps` calls each between two CUDA events; elsewhere as timeit."""
    if not torch.cuda.is_available():
        return _timer_median(fn, reps, warmup)
    for _ in range(warmup):
        fn()
    return statistics.median(_event_seconds(fn) for _ in range(reps))


def _event_seconds(fn) -> float:
    """Seconds of one fn() call between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _timer_median(fn, reps: int, warmup: int) -> float:
    """torch.utils.benchmark: `warmup` calls, then `reps` measurements of one call each (Timer.timeit makes two
    untimed calls before each), the median. The call count depends on nothing measured."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    for _ in range(warmup):
        fn()
    return statistics.median(timer.timeit(1).mean for _ in range(reps))


def _do_bench(do_bench, fn, reps: int, warmup: int) -> float:
    """do_bench picks its call counts from time budgets (ms) over its own estimate of one call; budgets from a
    first call's time ask it for at least `reps` timed and `warmup` untimed calls."""
    fn()
    once_ms = max(_event_seconds(fn) * 1e3, 1e-3)
    ms = do_bench(fn, warmup=max(25.0, warmup * once_ms * 1.5), rep=max(100.0, reps * once_ms * 1.5),
                  return_mode="median")
    return ms / 1e3


def bench_setup(doc: str, argv, extra) -> tuple:
    """The GPU benchmarks' common command line (--out, --smoke, and `extra`'s arguments), the output folder,
    and the device and dtype they measure: bf16 on a GPU, fp32 on the CPU (smoke runs)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is")
    extra(ap)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return args, out, device, torch.bfloat16 if device.type == "cuda" else torch.float32


def describe_device(info: dict) -> str:
    """One line of harness.record.device_environment's answer: the device and every version a measurement on it
    depends on."""
    name = info.get("device_name") or info.get("device")
    keys = ("driver", "cuda", "torch", "nccl", "triton") if info.get("cuda") else ("torch", "triton")
    labels = {"driver": "driver", "cuda": "CUDA", "torch": "torch", "nccl": "NCCL", "triton": "Triton"}
    return f"{name} (" + ", ".join(f"{labels[k]} {info.get(k)}" for k in keys) + ")"


def md_table(rows: Iterable[dict], cols: list[str], floatfmt: str = ".3g", skip_errors: bool = True,
             missing: Optional[str] = "") -> str:
    """A Markdown table of `rows` (dicts) in columns `cols`; rows with an `error` are left out (skip_errors);
    floats with `floatfmt`; a value a row lacks is `missing`."""
    rows = [r for r in rows if not (skip_errors and "error" in r)]
    frame = pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols).astype(object)
    frame = frame.where(frame.notna(), None)
    return frame.to_markdown(index=False, tablefmt="pipe", floatfmt=floatfmt, missingval=missing) + "\n"
