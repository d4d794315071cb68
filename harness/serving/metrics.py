"""Serving metrics: one row per request, and the run's summary (throughput, goodput, latency percentiles).

Definitions (times on the replay's wall clock, from its start):
- TTFT: first token - arrival (queueing included: arrival is the trace time, or the release under a logical
  clock or a closed loop).
- TPOT: (finish - first token) / (output tokens - 1), per request with at least 2 output tokens.
- ITL: the gap between consecutive tokens of one request (every decode token of the replay).
- E2E: finish - arrival.
- Goodput: completed requests per second with TTFT <= slo_ttft_ms and TPOT <= slo_tpot_ms, over the replay's
  duration (first arrival to last finish), as vLLM's `bench serve --goodput` counts it. DistServe's goodput (the
  highest rate at which a target share of requests meets both SLOs) is read off the goodput-against-rate curve, with
  `slo_attainment` (that share, every request of the window in the denominator, refused ones included).
Percentiles are numpy's (linear interpolation).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import pandas as pd

from harness.serving.scheduler import Scheduler

PERCENTILES = (50, 90, 99)


def request_table(sched: Scheduler) -> pd.DataFrame:
    req = sched.req
    ms = lambda x: x * 1e3  # noqa: E731
    out = req.output_len
    table = pd.DataFrame({
        "request": np.arange(len(req)), "source_line": req.source_line, "arrival_s": sched.arrival,
        "admitted_s": sched.admitted, "first_token_s": sched.first_token, "finished_s": sched.finished,
        "prompt_tokens": req.prompt_len, "output_tokens": out, "generated": sched.generated,
        "preemptions": sched.preemptions, "refused": sched.refused,
    })
    table["completed"] = ~np.isnan(sched.finished)
    table["queue_ms"] = ms(sched.admitted - sched.arrival)
    table["ttft_ms"] = ms(sched.first_token - sched.arrival)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["tpot_ms"] = np.where(out > 1, ms(sched.finished - sched.first_token) / (out - 1), np.nan)
    table["e2e_ms"] = ms(sched.finished - sched.arrival)
    return table


LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms")


@dataclass
class Stats:
    """One latency's mean and percentiles (PERCENTILES, numpy's linear interpolation); None without samples."""
    mean: Optional[float]
    p50: Optional[float]
    p90: Optional[float]
    p99: Optional[float]

    @classmethod
    def of(cls, values) -> "Stats":
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        if not len(v):
            return cls(None, None, None, None)
        return cls(float(v.mean()), *(float(x) for x in np.percentile(v, PERCENTILES)))

    def flat(self, name: str) -> dict:
        """The record's keys: `<name>_mean`, `<name>_p50`, ..."""
        return {f"{name}_mean": self.mean} | {f"{name}_p{p}": getattr(self, f"p{p}") for p in PERCENTILES}


@dataclass
class Latency:
    """TTFT, TPOT, ITL, end-to-end and queueing time of a replay (ms; see the module docstring)."""
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    queue_ms: Stats

    def flat(self) -> dict:
        """As the record's metrics hold them: `ttft_ms_mean`, `ttft_ms_p50`, ... in LATENCIES order."""
        out = {}
        for name in LATENCIES:
            out |= getattr(self, name).flat(name)
        return out

    def __getitem__(self, key: str) -> Optional[float]:
        """A flat key's value (`latency["ttft_ms_p99"]`)."""
        return self.flat()[key]

    @classmethod
    def from_flat(cls, metrics: dict) -> "Latency":
        return cls(**{name: Stats(metrics[f"{name}_mean"], *(metrics[f"{name}_p{p}"] for p in PERCENTILES))
                      for name in LATENCIES})


@dataclass
class ServingSummary:
    """A replay's summary; the record's `metrics` are its to_metrics()."""
    requests: int
    completed: int
    refused: int  # by the scheduler (can never fit), plus the trace's over_context=refuse
    refused_over_context: int
    unfinished: int
    preemptions: int
    steps: int
    offered_rate: float  # requests per second arriving: (requests - 1) / (last arrival - first), 0 if together
    duration_s: float
    request_throughput: float  # completed requests per second
    output_tokens_per_s: float
    total_tokens_per_s: float  # prompt + output tokens of completed requests per second
    output_tokens_per_s_per_gpu: float
    goodput: float  # requests per second meeting both SLOs
    goodput_per_gpu: float
    slo_attainment: float  # share of all requests meeting both SLOs (refused and unfinished ones do not)
    slo_ttft_ms: float
    slo_tpot_ms: float
    kv_blocks: int
    kv_occupancy_mean: float  # blocks held / blocks, over steps
    kv_occupancy_max: float
    batch_mean: float  # running requests per step
    latency: Latency  # ttft_ms, tpot_ms, itl_ms, e2e_ms, queue_ms: mean and percentiles

    def to_metrics(self) -> dict:
        """The record's flat `metrics` dict: the fields in order, then the latency keys (Latency.flat)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latency"} | self.latency.flat()

    @classmethod
    def from_metrics(cls, metrics: dict) -> "ServingSummary":
        """A serving record's `metrics` back into the summary (to_metrics' inverse)."""
        return cls(**{f.name: metrics[f.name] for f in fields(cls) if f.name != "latency"},
                   latency=Latency.from_flat(metrics))


def summarize(sched: Scheduler, table: pd.DataFrame, world: int, slo_ttft_ms: float, slo_tpot_ms: float) -> ServingSummary:
    over = sched.req.refused_over_context
    done = table[table.completed]
    start = float(np.nanmin(sched.arrival)) if np.isfinite(sched.arrival).any() else 0.0
    end = float(done.finished_s.max()) if len(done) else start
    duration = max(end - start, 1e-9)
    tpot_ok = done.tpot_ms.isna() | (done.tpot_ms <= slo_tpot_ms)  # one output token: no TPOT to miss
    good = int(((done.ttft_ms <= slo_ttft_ms) & tpot_ok).sum())
    itl = np.concatenate(sched.itl) * 1e3 if sched.itl else np.zeros(0)
    latency = Latency(ttft_ms=Stats.of(done.ttft_ms), tpot_ms=Stats.of(done.tpot_ms), itl_ms=Stats.of(itl),
                      e2e_ms=Stats.of(done.e2e_ms), queue_ms=Stats.of(done.queue_ms))
    used = np.asarray(sched.log["blocks_used"], dtype=np.float64) / max(sched.kv_blocks, 1)
    out_tokens = float(done.output_tokens.sum())
    return ServingSummary(
        requests=len(table) + over, completed=len(done), refused=int(table.refused.sum()) + over, refused_over_context=over,
        unfinished=int((~table.completed & ~table.refused).sum()), preemptions=int(table.preemptions.sum()),
        steps=sched.steps, offered_rate=offered_rate(sched.arrival), duration_s=duration, request_throughput=len(done) / duration,
        output_tokens_per_s=out_tokens / duration,
        total_tokens_per_s=(out_tokens + float(done.prompt_tokens.sum())) / duration,
        output_tokens_per_s_per_gpu=out_tokens / duration / world, goodput=good / duration,
        goodput_per_gpu=good / duration / world, slo_attainment=good / max(len(table) + over, 1), slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms, kv_blocks=sched.kv_blocks,
        kv_occupancy_mean=float(used.mean()) if len(used) else 0.0, kv_occupancy_max=float(used.max()) if len(used) else 0.0,
        batch_mean=float(np.mean(sched.log["running"])) if sched.log["running"] else 0.0, latency=latency)


def offered_rate(arrival: np.ndarray) -> float:
    a = arrival[~np.isnan(arrival)]
    span = float(a.max() - a.min()) if len(a) > 1 else 0.0
    return (len(a) - 1) / span if span > 0 else 0.0


def flat_metrics(summary: ServingSummary) -> dict:
    """The summary as the record's flat `metrics` dict (latency fields at the top level)."""
    return summary.to_metrics()


def step_table(sched: Scheduler) -> pd.DataFrame:
    """The scheduler's log: one row per step (start and end on the replay's clock, batch, queue, KV blocks held)."""
    return pd.DataFrame(sched.log)
