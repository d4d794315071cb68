"""How a run is measured: phase timers per rank, step timing, and the metrics computed from them."""
from __future__ import annotations

import gzip
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    import torch

PHASES = ("attention", "communication", "synchronization", "resource_management", "other")


class PhaseTimer:
    """Wall time per phase on one rank. Whatever is not inside a named phase counts as `other`.

    On CUDA the phase boundaries synchronize the device, so that a phase's time is its kernels' time; that
    serializes what would overlap (NCCL with compute, the pool with the base). So the runner times steps with
    the timer off (`enabled=False`: a phase is a no-op) and takes the breakdown from a separate pass with it on.
    """

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True):
        import torch  # here, not at the top: the collector and the report read this module without torch

        self.cuda = torch.device(device).type == "cuda"
        self._synchronize = torch.cuda.synchronize
        self.enabled = enabled
        self.reset()

    def reset(self):
        self.seconds = defaultdict(float)
        self._depth = 0
        self._start = self._now()

    def _now(self):
        if self.cuda and self.enabled:  # an off timer never synchronizes
            self._synchronize()
        return time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        if not self.enabled or self._depth:  # off, or nested: the outer phase keeps the time
            yield
            return
        self._depth += 1
        t0 = self._now()
        try:
            yield
        finally:
            self.seconds[phase] += self._now() - t0
            self._depth -= 1

    def report(self) -> dict:
        wall = self._now() - self._start
        named = {p: self.seconds.get(p, 0.0) for p in PHASES if p != "other"}
        named["other"] = max(wall - sum(named.values()), 0.0)
        return {"wall_s": wall, "phase_s": named}


class StepClock:
    """Marks step boundaries: prefill (TTFT) and each decode step (TPOT samples).

    On CPU, time.perf_counter. On CUDA, a CUDA event is recorded at every boundary on the current stream and
    nothing waits on it: the host keeps queueing work ahead of the GPU as it would unmeasured. `stop()`
    synchronizes once and turns the events into the GPU time between consecutive boundaries.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self._torch_cuda = torch.cuda
        self.times = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        ev = self._torch_cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def start(self):
        self.times, self.marks = [], [self._now()]

    def mark(self, _step=None):
        self.marks.append(self._now())

    def stop(self):
        """The step times, in seconds, of the marks so far (`times`)."""
        if self.cuda:
            self._torch_cuda.synchronize()
            self.times = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        else:
            self.times = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return self.times


KERNEL_KINDS = (("communication", ("nccl",)), ("attention", ("_split_kernel", "_merge_kernel", "_ragged_kernel", "_plan_kernel",
                                                             "attention", "flash", "fmha")),
                ("gemm", ("gemm", "gemv", "cutlass", "cublas", "sm90_", "nvjet")))


DECODE_RANGE = "decode_steps"  # the profiler range around a profiled generation's decode steps
PREFILL_RANGE = "prefill"  # ... and around its prefill (profile_prefill=true)


def device_events(prof, after_range: str | None = None) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every device activity (kernel, copy, fill; graph replays included) that a
    torch.profiler run saw; with after_range, only those that started after the host range of that name began
    (host and device share the profiler's clock). Annotations are no activity: record_function ranges and
    torch's own `nccl:send 0->1` ranges have device-side twins that span whole kernels and waits."""
    events = prof.events()
    begin = min((ev.time_range.start for ev in events if ev.name == after_range), default=float("-inf"))
    return [(ev.name, ev.time_range.start, ev.time_range.end) for ev in events
            if str(getattr(ev, "device_type", "")).endswith("CUDA") and not getattr(ev, "is_user_annotation", False)
            and ev.name != after_range and ev.time_range.start >= begin]


def trace_events(path, after_range: str | None = None) -> list[tuple[str, float, float]]:
    """device_events of a Chrome trace that torch.profiler wrote (profile_trace=true), to summarize it again."""
    with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as f:
        events = json.load(f)["traceEvents"]
    begin = min((e["ts"] for e in events if e.get("cat") == "user_annotation" and e.get("name") == after_range),
                default=float("-inf"))
    return sorted(((e["name"], e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e["ts"] >= begin), key=lambda e: e[1])


def kernel_kind(name: str) -> str:
    """communication (NCCL), attention, gemm or other, by the kernel's name."""
    return next((k for k, marks in KERNEL_KINDS if any(m in name.lower() for m in marks)), "other")


def kernel_summary(events: list[tuple[str, float, float]], top: int = 8) -> dict:
    """Device time by kind of kernel (NCCL = communication, attention, GEMMs, other) and the top kernels, in
    seconds, of device_events' list."""
    kinds, by_name = {k: 0.0 for k, _ in KERNEL_KINDS} | {"other": 0.0}, {}
    for name, start, end in events:
        kinds[kernel_kind(name)] += (end - start) / 1e6
        total, calls = by_name.get(name, (0.0, 0))
        by_name[name] = (total + (end - start) / 1e6, calls + 1)
    kernels = sorted(((t, n[:80], c) for n, (t, c) in by_name.items()), reverse=True)
    return {"device_s": kinds, "top_kernels": [{"name": n, "device_s": t, "calls": c} for t, n, c in kernels[:top]]}


def union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


TIMELINE_FIELDS = ("window_ms", "compute_ms", "nccl_only_ms", "idle_ms", "compute_share")  # timeline_summary's


def timeline_summary(events: list[tuple[str, float, float]], steps: int) -> dict:
    """Where a rank's GPU time went in a profiled window of `steps` decode steps, per step in ms.
    events: device_events' (name, start_us, end_us).
        window     first activity's start to last activity's end
        compute    the union of the non-NCCL activity: the work the step exists for
        nccl_only  NCCL kernels running while no compute does (transfers, and a receive spinning on its peer)
        idle       nothing on the GPU at all: the host had not issued the next work yet
    compute / window is the share of the step the GPU did useful work; the rest is what overlap could win."""
    if not events or steps <= 0:
        return {}
    window = max(e for _, _, e in events) - min(s for _, s, _ in events)
    compute = union_us([(s, e) for name, s, e in events if kernel_kind(name) != "communication"])
    busy = union_us([(s, e) for _, s, e in events])
    per_step = lambda us: us / steps / 1e3
    return {"steps": steps, "window_ms": per_step(window), "compute_ms": per_step(compute),
            "nccl_only_ms": per_step(busy - compute), "idle_ms": per_step(window - busy),
            "compute_share": compute / window if window else None}


def profile_summary(events: list[tuple[str, float, float]], steps: int) -> dict:
    """A rank's `profile` in the record: kernel time by kind and the step timeline, from its decode events."""
    return kernel_summary(events) | {"timeline": timeline_summary(events, steps)}


def nvml_utilization() -> float | None:
    """The GPU's utilization in percent as NVML reports it (its own sampling window), if NVML is there."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        return float(torch.cuda.utilization())
    except Exception:  # pynvml missing or NVML not usable in this container
        return None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy.percentile), q in [0, 100]."""
    return float(np.percentile(values, q))


@dataclass
class DecodeMetrics:
    """A decode run's metrics (the record's `metrics`; the README's metric table defines each)."""
    ttft_ms: Optional[float]  # the prefill (first token of the whole batch); None when the KV was synthetic
    mean_tpot_ms: float  # = (e2e - TTFT) / (output tokens - 1)
    median_tpot_ms: float
    p90_tpot_ms: float
    p99_tpot_ms: float
    e2e_ms: float
    tps: Optional[float]  # (input + output tokens) / e2e; None without a measured prefill
    decode_tps: float
    tps_per_gpu: Optional[float]
    num_gpus: int
    input_tokens: int
    output_tokens: int

    @classmethod
    def from_times(cls, ttft_s: float | None, decode_step_s: list[float], input_tokens: int, batch_size: int,
                   num_gpus: int) -> "DecodeMetrics":
        """ttft_s: prefill time, None when the KV was synthetic. decode_step_s: wall time of each decode step (each
        step yields one token per sequence)."""
        if not decode_step_s:
            raise ValueError("no decode steps were measured: TPOT needs at least 2 output tokens")
        decode_s = sum(decode_step_s)
        e2e_s = (ttft_s or 0.0) + decode_s
        output_tokens = batch_size * (len(decode_step_s) + 1)
        tpot = np.asarray(decode_step_s, dtype=np.float64) * 1e3
        p50, p90, p99 = (float(x) for x in np.percentile(tpot, (50, 90, 99)))
        tps = (input_tokens + output_tokens) / e2e_s if ttft_s is not None else None
        return cls(ttft_ms=None if ttft_s is None else ttft_s * 1e3, mean_tpot_ms=decode_s * 1e3 / len(decode_step_s),
                   median_tpot_ms=p50, p90_tpot_ms=p90, p99_tpot_ms=p99, e2e_ms=e2e_s * 1e3, tps=tps,
                   decode_tps=batch_size * len(decode_step_s) / decode_s,
                   tps_per_gpu=None if tps is None else tps / num_gpus, num_gpus=num_gpus, input_tokens=input_tokens,
                   output_tokens=output_tokens)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, metrics: dict) -> "DecodeMetrics":
        """A decode record's `metrics` back into the dataclass (to_dict's inverse)."""
        return cls(**{f.name: metrics[f.name] for f in fields(cls)})


def compute_metrics(ttft_s: float | None, decode_step_s: list[float], input_tokens: int, batch_size: int,
                    num_gpus: int) -> dict:
    """The record's metrics from measured times, as a dict (DecodeMetrics.from_times(...).to_dict())."""
    return DecodeMetrics.from_times(ttft_s, decode_step_s, input_tokens, batch_size, num_gpus).to_dict()


def pool_utilization(attention_s: float, resource_management_s: float, wall_s: float) -> float:
    """A pool rank's busy fraction: attention and resource-management time over wall time. The one definition for
    measured records (the instrumented pass's phase times) and projected ones (harness/perfmodel.py)."""
    return (attention_s + resource_management_s) / wall_s if wall_s > 0 else 0.0


def breakdown(phase_s: dict) -> dict:
    """Phase seconds -> fractions of their sum (which sum to 1)."""
    total = sum(phase_s.values())
    if total <= 0:
        return {p: (1.0 if p == "other" else 0.0) for p in PHASES}
    return {p: phase_s.get(p, 0.0) / total for p in PHASES}
