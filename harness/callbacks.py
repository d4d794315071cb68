"""Hydra callbacks: at the end of a multirun, print the comparison table of the sweep's records."""
from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.collect import collect

log = logging.getLogger("fapool")


def varied_fields(df, shown, limit: int = 4) -> list[str]:
    """Config fields a sweep varied besides what is shown (e.g. strategy.pool.threshold)."""
    out = []
    for c in df.columns:
        if not c.startswith("config.") or c in shown or c == "config.results_dir" or df[c].astype(str).nunique() <= 1:
            continue
        # fields that follow from a swept strategy or workload preset are implied by its name
        if c.startswith("config.strategy.") and df["config.strategy.name"].nunique() > 1:
            continue
        if c.startswith("config.workload.") and df["config.workload.name"].nunique() > 1:
            continue
        out.append(c)
    return out[:limit]


def comparison_table(df) -> str:
    """One row per run: strategy, workload, GPUs/ranks, TPOT, TPS, speed-up of TPOT vs the reference."""
    if df.empty:
        return "(no records)"
    cols = ["config.strategy.name", "config.workload.name", "source", "status", "metrics.num_gpus", "metrics.mean_tpot_ms",
            "metrics.p90_tpot_ms", "metrics.tps", "metrics.tps_per_gpu", "reference_check.passed"]
    df = df.copy()
    for c in cols:
        if c not in df:
            df[c] = None
    ref = df[(df["config.strategy.kind"] == "reference") & (df["status"] == "ok")]
    ref_tpot = dict(zip(ref["config.workload.name"], ref["metrics.mean_tpot_ms"]))
    df["tpot_speedup_vs_reference"] = [ref_tpot.get(w, float("nan")) / t if t else float("nan")
                                       for w, t in zip(df["config.workload.name"], df["metrics.mean_tpot_ms"])]
    varied = varied_fields(df, cols)
    out = df[cols[:2] + varied + cols[2:] + ["tpot_speedup_vs_reference"]].sort_values(
        ["config.workload.name", "config.strategy.name"] + varied)
    out.columns = ["strategy", "workload"] + [c.removeprefix("config.") for c in varied] + [
        "source", "status", "ranks", "mean TPOT ms", "p90 TPOT ms", "TPS", "TPS/rank", "matches ref", "TPOT speed-up vs ref"]
    return out.to_markdown(index=False, floatfmt=".3g")


def print_plan(lines: list[dict]) -> None:
    import pandas as pd

    df = pd.DataFrame(lines)
    print("\nPlan (nothing was submitted or run):")
    print(df.to_markdown(index=False, floatfmt=".3g"))
    print(f"total: {len(df)} jobs, {int(df['gpus'].sum())} GPUs over all jobs, at most "
          f"{df['gpu_hours_limit'].sum():.1f} GPU-hours (the jobs' time limits)"
          + (f", projected {(df['projected_run_s'] * df['gpus']).sum() / 3600:.3f} GPU-hours of run time"
             if "projected_run_s" in df else ""))


class PrintComparison(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from harness.plan import PLANNED

        if PLANNED:
            print_plan(PLANNED)
            PLANNED.clear()
            return
        if "harness.slurm" in sys.modules:  # Slurm jobs of this sweep still queued or running
            from harness.slurm import PENDING, wait_all

            if PENDING:
                print(f"waiting for {len(PENDING)} Slurm jobs ...", flush=True)
                wait_all()
        df, bad = collect(config.hydra.sweep.dir)
        trace = df["config.workload.kind"].eq("trace") if "config.workload.kind" in df else df.index.isin([])
        print("\nResults of this sweep ('measured' on this machine, or 'projected' by harness/perfmodel.py; "
              "mean over the decode steps; README defines every column):")
        print(comparison_table(df[~trace]) if trace.any() and not trace.all() else
              "(trace replays only: see the serving table below)" if trace.any() else comparison_table(df))
        if trace.any():
            from harness.serving.report import serving_table

            print("\nTrace replays (README: Serving mode defines every column):")
            print(serving_table(df).to_markdown(index=False, floatfmt=".4g"))
        for path, why in bad:
            print(f"skipped {path}: {why}")
        try:  # the full report (tables, plots) beside the sweep's records
            from harness.report import report

            r = report(config.hydra.sweep.dir)
            print(f"report: {r['out']}")
        except Exception as e:  # a report failure must not hide the sweep's records
            log.exception("report failed: %s", e)
        not_ok = int((df["status"] != "ok").sum()) if not df.empty else 0
        if (not_ok or bad) and config.get("fail_on_error", True):  # a script or CI job must notice
            print(f"{not_ok} point(s) not ok and {len(bad)} unreadable record(s): exit status 1 "
                  "(fail_on_error=false keeps 0)")
            sys.exit(1)
