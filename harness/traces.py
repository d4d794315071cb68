"""Request traces: read a real trace (Mooncake JSONL, Azure CSV), take a window, re-time and re-size it.

A trace is plain data: one `Requests` of numpy arrays (arrival seconds, prompt and output lengths, and the
Mooncake prefix-block ids, kept but not used: prefix reuse is out of scope). Prompts are seeded random token
ids of the trace's lengths (`prompt_tokens`); a request generates exactly its trace's output length.

Every problem with the input is a `TraceError` naming the file and line (or the field) and the fix.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import List

import numpy as np

FORMATS = ("mooncake", "azure")
ARRIVALS = ("trace", "poisson", "closed")
OVER_CONTEXT = ("refuse", "clip")
UNSORTED = ("sort", "refuse")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file and line, or the field, and the fix."""


@dataclass
class TraceConfig:
    """workload.trace: which requests arrive when, and how long they are."""

    path: str = "results/reference/traces/mooncake_conversation_sample.jsonl"  # relative: to the cwd, else the project
    format: str = "mooncake"  # mooncake (JSONL: timestamp ms, input_length, output_length, hash_ids) | azure (CSV)
    first_n: int = 0  # the window: the first N requests of the file (0: all) ...
    start_s: float = 0.0  # ... arriving in [start_s, end_s) of the trace's own clock (end_s 0: to the end)
    end_s: float = 0.0
    unsorted: str = "refuse"  # timestamps out of order: refuse (name the line) | sort (stable, by arrival)
    arrival: str = "trace"  # trace (its timestamps) | poisson (at `rate`) | closed (`concurrency` in flight)
    rate: float = 0.0  # requests per second: poisson's rate; with arrival=trace, re-times arrivals to this mean rate (0: as recorded)
    burstiness: float = 1.0  # poisson: gamma shape of the gaps (1: exponential, as vLLM's bench serve)
    concurrency: int = 0  # closed loop: requests in flight (a new one arrives as one finishes)
    time_scale: float = 1.0  # arrival=trace: gaps multiplied by this (0.5 replays twice as fast)
    length_scale: float = 1.0  # prompt and output lengths multiplied by this (rounded, at least 1) ...
    output_scale: float = 0.0  # ... output lengths by this instead, where > 0 (a scaled-down model keeps a few outputs)
    max_context: int = 0  # prompt + output tokens a request may hold (0: no limit) ...
    over_context: str = "refuse"  # ... beyond it: refuse (counted, never run) | clip (prompt cut to fit, counted)
    seed: int = 0  # prompt token ids and poisson gaps

    def __post_init__(self):
        g = "workload.trace"
        for name, allowed in (("format", FORMATS), ("arrival", ARRIVALS), ("over_context", OVER_CONTEXT),
                              ("unsorted", UNSORTED)):
            if getattr(self, name) not in allowed:
                raise TraceError(f"{g}.{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("first_n", "start_s", "end_s", "rate", "concurrency", "max_context", "seed", "output_scale"):
            if not getattr(self, name) >= 0:
                raise TraceError(f"{g}.{name}={getattr(self, name)} must be >= 0")
        for name in ("time_scale", "length_scale", "burstiness"):
            if not getattr(self, name) > 0:
                raise TraceError(f"{g}.{name}={getattr(self, name)} must be > 0")
        if self.end_s and self.end_s <= self.start_s:
            raise TraceError(f"{g}.end_s={self.end_s} must be above start_s={self.start_s} (or 0: to the end)")
        if self.arrival == "poisson" and self.rate <= 0:
            raise TraceError(f"{g}.arrival=poisson needs {g}.rate > 0 (requests per second)")
        if self.arrival == "closed" and self.concurrency < 1:
            raise TraceError(f"{g}.arrival=closed needs {g}.concurrency >= 1 (requests in flight)")


@dataclass
class Requests:
    """A replayable trace: column arrays, one entry per request, in arrival order."""

    arrival_s: np.ndarray  # float64, seconds from the replay's start (closed loop: 0, the loop times them)
    prompt_len: np.ndarray  # int64
    output_len: np.ndarray  # int64
    source_line: np.ndarray  # int64: the line of the trace file each request came from
    hash_ids: List[list] = field(default_factory=list)  # Mooncake's prefix-block ids (read and kept, not used)
    refused_over_context: int = 0  # requests dropped by over_context=refuse
    clipped_over_context: int = 0  # prompts cut by over_context=clip

    def __len__(self) -> int:
        return len(self.arrival_s)

    def summary(self) -> dict:
        span = float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0
        return {"requests": len(self), "span_s": span, "prompt_mean": float(self.prompt_len.mean()),
                "prompt_median": float(np.median(self.prompt_len)), "prompt_max": int(self.prompt_len.max()),
                "output_mean": float(self.output_len.mean()), "refused_over_context": self.refused_over_context,
                "clipped_over_context": self.clipped_over_context}


def resolve_path(path: str) -> Path:
    """A trace path as given: absolute, relative to the working directory, or relative to the project (where the
    shipped samples live). A path found nowhere is an error naming the places looked in."""
    p = Path(path).expanduser()
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]):
        if candidate.is_file():
            return candidate
    looked = str(p) if p.is_absolute() else f"{Path.cwd() / p} and {PROJECT_ROOT / p}"
    raise TraceError(f"workload.trace.path={path!r}: no such file (looked at {looked}); point it at a Mooncake "
                     f"JSONL or Azure CSV trace, e.g. results/reference/traces/mooncake_conversation_sample.jsonl")


# The shipped sample is the first SAMPLE_REQUESTS lines of the full Mooncake conversation trace (FULL_TRACE_NAME);
# a full trace is kept outside the repository, in one of TRACE_DIRS (relative to the project)
SAMPLE_PATH = "results/reference/traces/mooncake_conversation_sample.jsonl"
SAMPLE_REQUESTS = 300
FULL_TRACE_NAME = "mooncake_conversation_trace.jsonl"
TRACE_DIRS = (".traces", "../shared/traces", "shared/traces")


def recorded_trace(cfg: TraceConfig) -> TraceConfig:
    """The trace of a recorded replay (a committed record's workload.trace), its file found on this machine: the
    path it recorded where that exists; else a file of the same name in one of TRACE_DIRS; else, for a window of
    the full trace's first requests that the shipped sample holds, the sample (the same lines). Raises TraceError
    naming where it looked."""
    try:
        resolve_path(cfg.path)
        return cfg
    except TraceError as missing:
        why = str(missing)
    name = Path(cfg.path).name
    for folder in TRACE_DIRS:
        if (PROJECT_ROOT / folder / name).is_file():
            return dataclasses.replace(cfg, path=str((PROJECT_ROOT / folder / name).resolve()))
    if name == FULL_TRACE_NAME and 0 < cfg.first_n <= SAMPLE_REQUESTS and not (cfg.start_s or cfg.end_s):
        return dataclasses.replace(cfg, path=str(PROJECT_ROOT / SAMPLE_PATH))
    raise TraceError(f"{why}; nor is {name} in the project's {', '.join(TRACE_DIRS)}: put the trace in one of them")


def _positive_int(value, name: str, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {name}={value!r} is not an integer") from None
    if n < 1 or n != float(value):
        raise TraceError(f"{where}: {name}={value!r} must be a whole number >= 1; drop or fix the line")
    return n


def read_mooncake(path: Path) -> tuple[list, list, list, list, list]:
    arrivals, prompts, outputs, lines, hashes = [], [], [], [], []
    with open(path) as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not a JSON object ({e.msg}); each line must be one request "
                                 f'{{"timestamp": ms, "input_length": n, "output_length": n}}') from None
            if not isinstance(row, dict):
                raise TraceError(f"{where}: a line must be a JSON object, got {type(row).__name__}")
            for key in ("timestamp", "input_length", "output_length"):
                if key not in row:
                    raise TraceError(f"{where}: no field {key!r}; a Mooncake line has timestamp, input_length, "
                                     f"output_length (and hash_ids)")
            ts = row["timestamp"]
            if not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
                raise TraceError(f"{where}: timestamp={ts!r} must be milliseconds >= 0")
            arrivals.append(ts / 1e3)
            prompts.append(_positive_int(row["input_length"], "input_length", where))
            outputs.append(_positive_int(row["output_length"], "output_length", where))
            lines.append(n)
            hashes.append(list(row.get("hash_ids", [])))
    return arrivals, prompts, outputs, lines, hashes


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def read_azure(path: Path) -> tuple[list, list, list, list, list]:
    arrivals, prompts, outputs, lines = [], [], [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:3]) != AZURE_COLUMNS:
            raise TraceError(f"{path}:1: the header must be {','.join(AZURE_COLUMNS)} (the Azure LLM inference trace "
                             f"format), got {header!r}; for a Mooncake JSONL set workload.trace.format=mooncake")
        first = None
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            where = f"{path}:{n}"
            if len(row) < 3:
                raise TraceError(f"{where}: {len(row)} columns; need {','.join(AZURE_COLUMNS)}")
            try:  # 7 decimals of a second: trimmed to the microseconds datetime reads
                stamp = datetime.strptime(row[0].strip()[:26], "%Y-%m-%d %H:%M:%S.%f")
            except ValueError:
                raise TraceError(f"{where}: TIMESTAMP={row[0]!r} is not 'YYYY-MM-DD HH:MM:SS.fffffff'") from None
            first = stamp if first is None else first
            arrivals.append((stamp - first).total_seconds())
            prompts.append(_positive_int(row[1], "ContextTokens", where))
            outputs.append(_positive_int(row[2], "GeneratedTokens", where))
            lines.append(n)
    return arrivals, prompts, outputs, lines, []


def load_trace(cfg: TraceConfig) -> Requests:
    """The requests of cfg's window, re-timed and re-sized as cfg says. Raises TraceError."""
    path = resolve_path(cfg.path)
    arrivals, prompts, outputs, lines, hashes = (read_mooncake if cfg.format == "mooncake" else read_azure)(path)
    if not arrivals:
        raise TraceError(f"{path}: no requests in the file; is workload.trace.format={cfg.format!r} right?")
    arrival = np.asarray(arrivals, dtype=np.float64)
    line = np.asarray(lines, dtype=np.int64)
    order = np.arange(len(arrival))
    back = np.nonzero(np.diff(arrival) < 0)[0]
    if len(back):
        if cfg.unsorted == "refuse":
            i = int(back[0]) + 1
            raise TraceError(f"{path}:{line[i]}: timestamp goes back in time ({arrival[i]:.3f} s after "
                             f"{arrival[i - 1]:.3f} s on line {line[i - 1]}); set workload.trace.unsorted=sort to "
                             f"replay the file in arrival order")
        order = np.argsort(arrival, kind="stable")
    prompt = np.asarray(prompts, dtype=np.int64)[order]
    output = np.asarray(outputs, dtype=np.int64)[order]
    arrival, line = arrival[order], line[order]
    hash_ids = [hashes[i] for i in order] if hashes else []
    keep = np.ones(len(arrival), dtype=bool)
    if cfg.start_s or cfg.end_s:
        keep &= arrival >= cfg.start_s
        if cfg.end_s:
            keep &= arrival < cfg.end_s
    picked = np.nonzero(keep)[0]
    if cfg.first_n:
        picked = picked[: cfg.first_n]
    if len(picked) == 0:
        raise TraceError(f"{path}: the window (workload.trace.start_s={cfg.start_s}, end_s={cfg.end_s}, "
                         f"first_n={cfg.first_n}) holds no request; the file's arrivals span "
                         f"{arrival[0]:.1f}-{arrival[-1]:.1f} s")
    arrival, prompt, output, line = arrival[picked], prompt[picked], output[picked], line[picked]
    hash_ids = [hash_ids[i] for i in picked] if hash_ids else []
    arrival = arrival - arrival[0]
    if cfg.length_scale != 1.0:
        prompt = np.maximum(1, np.rint(prompt * cfg.length_scale)).astype(np.int64)
    out_scale = cfg.output_scale or cfg.length_scale
    if out_scale != 1.0:
        output = np.maximum(1, np.rint(output * out_scale)).astype(np.int64)
    refused = clipped = 0
    if cfg.max_context:
        over = prompt + output > cfg.max_context
        if cfg.over_context == "clip":
            room = cfg.max_context - np.minimum(output, cfg.max_context - 1)
            clipped = int(over.sum())
            output = np.where(over, np.minimum(output, cfg.max_context - 1), output)
            prompt = np.where(over, np.minimum(prompt, room), prompt)
        else:
            refused = int(over.sum())
            ok = ~over
            if not ok.any():
                raise TraceError(f"{path}: every request of the window exceeds workload.trace.max_context="
                                 f"{cfg.max_context}; raise it, lower length_scale or set over_context=clip")
            arrival, prompt, output, line = arrival[ok], prompt[ok], output[ok], line[ok]
            hash_ids = [h for h, k in zip(hash_ids, ok) if k] if hash_ids else []
            arrival = arrival - arrival[0]
    arrival = retime(arrival, cfg)
    return Requests(arrival, prompt, output, line, hash_ids, refused, clipped)


def retime(arrival: np.ndarray, cfg: TraceConfig) -> np.ndarray:
    """Arrival seconds as cfg.arrival says: the trace's (scaled, or re-timed to cfg.rate), Poisson (gamma gaps of
    shape `burstiness`, mean 1 / rate), or all zero for a closed loop (the replay admits them as others finish)."""
    if cfg.arrival == "closed":
        return np.zeros_like(arrival)
    if cfg.arrival == "poisson":
        gen = np.random.default_rng(cfg.seed)
        gaps = gen.gamma(cfg.burstiness, 1.0 / (cfg.rate * cfg.burstiness), size=len(arrival))
        gaps[0] = 0.0
        return np.cumsum(gaps)
    out = arrival * cfg.time_scale
    if cfg.rate and len(out) > 1 and out[-1] > 0:  # the same shape, stretched to the asked mean rate
        out = out * ((len(out) - 1) / cfg.rate) / out[-1]
    return out


def prompt_tokens(seed: int, request: int, length: int, vocab_size: int) -> np.ndarray:
    """Request `request`'s prompt: `length` seeded random token ids, the same on every rank and run."""
    return np.random.default_rng([seed, request]).integers(0, vocab_size, size=length, dtype=np.int64)
