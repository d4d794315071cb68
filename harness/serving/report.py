"""Trace replays in the report: one table, latency against load, goodput against rate, per-request CDFs, and the KV
(or pool) occupancy over the replay beside the trace's long-request load. Read from the collected frame
(harness/collect.py) and the per-request and per-step tables beside each record."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from harness.collect import natural_key
from harness.strategies import family_of

COLUMNS = {  # frame column -> table header
    "source": "source", "strategy": "strategy", "gpus": "GPUs", "config.workload.name": "workload",
    "config.workload.trace.arrival": "arrival", "metrics.offered_rate": "offered req/s", "metrics.completed": "completed",
    "metrics.refused": "refused", "metrics.unfinished": "unfinished", "metrics.ttft_ms_p50": "TTFT p50 ms",
    "metrics.ttft_ms_p99": "TTFT p99 ms", "metrics.tpot_ms_p50": "TPOT p50 ms", "metrics.tpot_ms_p99": "TPOT p99 ms",
    "metrics.itl_ms_p99": "ITL p99 ms", "metrics.output_tokens_per_s_per_gpu": "out tok/s/GPU",
    "metrics.goodput": "goodput req/s", "metrics.goodput_per_gpu": "goodput/GPU", "metrics.slo_ttft_ms": "SLO TTFT ms",
    "metrics.slo_tpot_ms": "SLO TPOT ms", "metrics.preemptions": "preemptions", "reference_check.passed": "check",
}


def serving_runs(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty or "config.workload.kind" not in df:
        return pd.DataFrame()
    d = df[(df["status"] == "ok") & (df["config.workload.kind"] == "trace")].copy()
    d["strategy"] = d["config.strategy.name"]
    d["gpus"] = d["config.strategy.world_size"]
    return d


def serving_table(df: pd.DataFrame) -> pd.DataFrame:
    d = serving_runs(df)
    if d.empty:
        return pd.DataFrame()
    cols = [c for c in COLUMNS if c in d]
    t = d.sort_values(["source", "gpus", "config.workload.name", "strategy", "metrics.offered_rate"], key=natural_key)[cols]
    return t.rename(columns=COLUMNS).reset_index(drop=True)


def _save(fig, out: Path, name: str) -> list[Path]:
    fig.tight_layout()
    files = [out / f"{name}.png", out / f"{name}.pdf"]
    for f in files:
        fig.savefig(f, dpi=120)
    plt.close(fig)
    return files


def _curves(ax, d, y, ylabel):
    for (gpus, strategy, source), g in d.groupby(["gpus", "strategy", "source"]):
        g = g.sort_values("metrics.offered_rate")
        ax.plot(g["metrics.offered_rate"], g[y], marker="o", linestyle="-" if source == "measured" else "--",
                label=f"{strategy} ({gpus} GPU{'s' if gpus > 1 else ''}, {source})")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _tables(row, name: str) -> pd.DataFrame | None:
    path = Path(row["path"]) / str(row.get(f"serving.files.{name}", f"{name}.csv"))
    return pd.read_csv(path) if path.is_file() else None


POOL_BIN_S = 60.0  # pool_occupancy.csv: one row per this many seconds of replay time


def pool_occupancy(steps: pd.DataFrame, bin_s: float = POOL_BIN_S) -> pd.DataFrame:
    """FA Pool's pool over a replay, from its step log: per bin of bin_s seconds of replay time (by step end), the
    steps, the mean and largest number of pool ranks in use and of requests in the pool, the largest pool blocks
    held, and the migrations into it."""
    d = steps.assign(bin_start_s=(steps["end"] // bin_s) * bin_s)
    g = d.groupby("bin_start_s")
    return pd.DataFrame({"steps": g.size(), "pool_ranks_used_mean": g.pool_ranks_used.mean(),
                         "pool_ranks_used_max": g.pool_ranks_used.max(), "pool_rows_mean": g.pool_rows.mean(),
                         "pool_rows_max": g.pool_rows.max(), "pool_blocks_used_max": g.pool_blocks_used.max(),
                         "migrated": g.migrated.sum()}).reset_index()


def plot_serving(df: pd.DataFrame, out: Path) -> list[Path]:
    """The serving figures, where the results hold trace replays (none otherwise)."""
    d = serving_runs(df)
    if d.empty:
        return []
    files = []
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (col, label) in zip(axes.flat, (("metrics.ttft_ms_p50", "TTFT p50 (ms)"), ("metrics.ttft_ms_p99", "TTFT p99 (ms)"),
                                            ("metrics.tpot_ms_p50", "TPOT p50 (ms)"), ("metrics.tpot_ms_p99", "TPOT p99 (ms)"))):
        _curves(ax, d, col, label)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Latency against load (one line per strategy and GPU count)")
    files += _save(fig, out, "latency_vs_load")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _curves(ax, d, "metrics.goodput_per_gpu", "goodput per GPU (requests/s within both SLOs)")
    slo = d.iloc[0]
    ax.set_title(f"Goodput against rate (SLO: TTFT <= {slo['metrics.slo_ttft_ms']:g} ms, TPOT <= {slo['metrics.slo_tpot_ms']:g} ms)")
    ax.legend(fontsize=7)
    files += _save(fig, out, "goodput_vs_rate")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for _, row in d.iterrows():
        t = _tables(row, "requests")
        if t is None:
            continue
        label = f"{row['strategy']} @ {row['metrics.offered_rate']:.2g}/s" if row['metrics.offered_rate'] else f"{row['strategy']} (arriving together)"
        for ax, col in ((a1, "ttft_ms"), (a2, "tpot_ms")):
            v = np.sort(t[col].dropna().to_numpy())
            if len(v):
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=label)
    for ax, what in ((a1, "TTFT (ms)"), (a2, "TPOT (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel(what)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    a1.legend(fontsize=6)
    files += _save(fig, out, "request_cdfs")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    twin = ax.twinx()
    for _, row in d.head(6).iterrows():
        steps, reqs = _tables(row, "steps"), _tables(row, "requests")
        if steps is None or reqs is None:
            continue
        ax.plot(steps["end"], steps["blocks_used"] / row["metrics.kv_blocks"], label=f"{row['strategy']}: KV held")
        threshold = row.get("config.strategy.pool.threshold", 4096)
        long = reqs[reqs.prompt_tokens > threshold]
        times = steps["end"].to_numpy()
        in_system = ((long.arrival_s.to_numpy()[:, None] <= times) & (long.finished_s.fillna(np.inf).to_numpy()[:, None] > times)).sum(0)
        twin.plot(times, in_system, linestyle=":", label=f"{row['strategy']}: requests > {threshold:g} tokens in the system")
    ax.set_xlabel("replay time (s)")
    ax.set_ylabel("KV blocks held / blocks")
    twin.set_ylabel("long requests in the system")
    ax.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="upper right")
    files += _save(fig, out, "kv_occupancy")

    pools = d[d["config.strategy.kind"].map(family_of) == "offload"]
    if not pools.empty:  # FA Pool's dynamic adaptation: pool ranks in use against the long requests present
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        binned = []
        for drawn, (_, row) in enumerate(pools.iterrows()):
            steps = _tables(row, "steps")
            if steps is None:
                continue
            binned.append(pool_occupancy(steps).assign(strategy=row["strategy"], gpus=row["gpus"],
                                                       offered_rate=row["metrics.offered_rate"]))
            if drawn >= 6:  # the figure shows the first six replays; the table has them all
                continue
            label = f"{row['strategy']} @ {row['metrics.offered_rate']:.2g}/s" if row['metrics.offered_rate'] else f"{row['strategy']} (arriving together)"
            a1.step(steps["end"], steps["pool_ranks_used"], where="post", label=label)
            a2.step(steps["end"], steps["pool_rows"], where="post", label=f"{label}: requests in the pool")
            moved = steps[steps.migrated > 0]
            a2.scatter(moved["end"], moved["pool_rows"], marker="^", s=20)
        a1.set_ylabel("pool ranks in use")
        a2.set_ylabel("requests in the pool (^: a migration)")
        a2.set_xlabel("replay time (s)")
        a1.legend(fontsize=7)
        a1.set_title("FA Pool occupancy over the replay")
        files += _save(fig, out, "pool_occupancy")
        if binned:  # the figure's numbers, binned, for sets that keep records but not step logs
            path = Path(out) / "pool_occupancy.csv"
            pd.concat(binned, ignore_index=True).to_csv(path, index=False, float_format="%.4g")
            files.append(path)
    return files
