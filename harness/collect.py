"""The collector: every result.json under a directory tree -> one tidy DataFrame (one row per run).

Corrupt, truncated, empty or unknown-version files are skipped and listed with the reason; they never
crash the collection.
"""
from __future__ import annotations

import json
import numbers
import re
from pathlib import Path

import numpy as np
import pandas as pd

from harness.measure import TIMELINE_FIELDS
from harness.record import RunRecord


def natural_key(s: pd.Series) -> pd.Series:
    """A sort key (for `sort_values(key=...)`) that orders the numbers inside names by value: len2048 before
    len16384, where a string sort puts it after. Numbers sort by value too."""
    def key(v):
        if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and v == v:  # a number (not NaN): its value
            return ("", v)
        return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(v)))

    return s.map(key)


def find_records(root: str | Path) -> tuple[list[tuple[Path, RunRecord]], list[tuple[Path, str]]]:
    good, bad = [], []
    for path in sorted(Path(root).rglob("result.json")):
        try:
            text = path.read_text()
            if not text.strip():
                raise ValueError("empty file")
            good.append((path, RunRecord.from_dict(json.loads(text))))
        except (OSError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            bad.append((path, f"{type(e).__name__}: {e}"))
    return good, bad


def _flatten(prefix: str, value, row: dict):
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, row)
    elif isinstance(value, list):
        row[prefix] = json.dumps(value)
    else:
        row[prefix] = value


def mean_prompt_length(workload: dict) -> float | None:
    """The workload's nominal sequence length: mean prompt length, or the mean of its buckets' midpoints."""
    if workload.get("buckets"):
        mean = sum((lo + hi) / 2 for lo, hi in workload["buckets"]) / len(workload["buckets"])
    else:
        lens = workload.get("prompt_lens") or []
        mean = sum(lens) / len(lens) if lens else None
    return int(mean) if mean is not None and float(mean).is_integer() else mean


def role_timelines(ranks: list[dict]) -> dict:
    """{role: {field: mean over the role's ranks}} of the profiled pass's step timeline (profile=true on a GPU;
    harness/measure.timeline_summary): where a decode step goes on each kind of GPU."""
    by_role = {}
    for r in ranks:
        timeline = (r.get("profile") or {}).get("timeline")
        if timeline:
            by_role.setdefault(r.get("role"), []).append(timeline)
    return {role: {f: sum(t[f] for t in ts) / len(ts) for f in TIMELINE_FIELDS if all(t.get(f) is not None for t in ts)}
            for role, ts in by_role.items()}


def to_frame(records: list[tuple[Path, RunRecord]]) -> pd.DataFrame:
    rows = []
    for path, rec in records:
        row = {"path": str(path.parent), "run_id": rec.run_id, "status": rec.status, "error": rec.error,
               "synthetic_kv": rec.synthetic_kv, "created_at": rec.created_at}
        _flatten("config", rec.config, row)
        _flatten("metrics", rec.metrics, row)
        _flatten("breakdown", rec.breakdown, row)
        _flatten("memory", rec.memory, row)
        _flatten("timeline", role_timelines(rec.ranks), row)
        if rec.reference_check:
            _flatten("reference_check", rec.reference_check, row)
        if rec.serving:
            _flatten("serving", rec.serving, row)
        util = list(rec.pool_utilization.values())
        row["pool_utilization_mean"] = sum(util) / len(util) if util else None
        nvml = [r["nvml_utilization_pct"] for r in rec.ranks if r.get("role") == "pool" and r.get("nvml_utilization_pct") is not None]
        row["pool_nvml_utilization_pct_mean"] = sum(nvml) / len(nvml) if nvml else None
        row["source"] = rec.env.get("source", "measured")
        row["seq_len"] = mean_prompt_length(rec.config.get("workload", {}))
        row["elasticity"] = json.dumps(rec.elasticity) if rec.elasticity else None
        row["device_name"] = rec.env.get("device_name", rec.env.get("device"))
        rows.append(row)
    return pd.DataFrame(rows)


def collect(root: str | Path) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    good, bad = find_records(root)
    return to_frame(good), bad
