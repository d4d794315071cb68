"""Hydra callbacks: at the end of a multirun, print the comparison table of the sweep's records; with plan=true,
print the plan and leave no folder behind."""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.collect import collect, natural_key
from harness.plan import Sweep
from harness.strategies import family_of

log = logging.getLogger("fapool")


def varied_fields(df) -> list[str]:
    """Config fields that differ between runs of the same strategy and workload preset (a swept
    workload.output_tokens or strategy.pool.threshold): without them such rows would look like duplicates.
    Fields that follow from a preset's name (a strategy's tp) do not differ within it and stay out."""
    from harness.report import split_fields

    return split_fields(df, ["config.strategy.name", "config.workload.name"])


NO_REF = "-"  # the speed-up column where the sweep has no ok reference run of the row's workload


def comparison_table(df) -> str:
    """One row per run: strategy, workload, the fields that differ between runs of the same ones, GPUs/ranks,
    TPOT, TPS, speed-up of TPOT vs the reference (with a note where there is none)."""
    if df.empty:
        return "(no records)"
    cols = ["config.strategy.name", "config.workload.name", "source", "status", "metrics.num_gpus", "metrics.mean_tpot_ms",
            "metrics.p90_tpot_ms", "metrics.tps", "metrics.tps_per_gpu", "reference_check.passed"]
    df = df.copy()
    for c in cols + ["config.strategy.kind"]:
        if c not in df:
            df[c] = None
    varied = [c for c in varied_fields(df) if c not in cols]
    # the reference of a row: an ok reference run of the same workload and the same swept fields (strategy ones aside)
    same = ["config.workload.name"] + [c for c in varied if not c.startswith("config.strategy.")]
    ref = df[(df["config.strategy.kind"].map(family_of) == "reference") & (df["status"] == "ok")]
    ref_tpot = {tuple(k): t for k, t in zip(ref[same].astype(str).itertuples(index=False), ref["metrics.mean_tpot_ms"])}
    speedups = []
    for k, t in zip(df[same].astype(str).itertuples(index=False), df["metrics.mean_tpot_ms"]):
        r = ref_tpot.get(tuple(k))
        speedups.append(NO_REF if r is None else r / t if t else float("nan"))
    df["tpot_speedup_vs_reference"] = speedups
    out = df[cols[:2] + varied + cols[2:] + ["tpot_speedup_vs_reference"]].sort_values(
        ["config.workload.name", "config.strategy.name"] + varied, key=natural_key)
    out.columns = ["strategy", "workload"] + [c.removeprefix("config.") for c in varied] + [
        "source", "status", "ranks", "mean TPOT ms", "p90 TPOT ms", "TPS", "TPS/rank", "matches ref", "TPOT speed-up vs ref"]
    if NO_REF in speedups:  # a column of text and numbers: tabulate would print the numbers unformatted
        out["TPOT speed-up vs ref"] = [x if x == NO_REF else f"{x:.3g}" for x in out["TPOT speed-up vs ref"]]
    table = out.to_markdown(index=False, floatfmt=".3g")
    if NO_REF in speedups:
        table += (f"\n{NO_REF} in 'TPOT speed-up vs ref': this sweep has no ok reference run of that workload"
                  + (f" and {', '.join(c.removeprefix('config.') for c in same[1:])}" if same[1:] else "")
                  + " (add strategy=reference to the sweep to get one)")
    return table


def print_plan(lines: list[dict]) -> None:
    import pandas as pd

    df = pd.DataFrame(lines)
    print("\nPlan (nothing was submitted or run):")
    print(df.to_markdown(index=False, floatfmt=".3g"))
    print(f"total: {len(df)} jobs, {int(df['gpus'].sum())} GPUs over all jobs, at most "
          f"{df['gpu_hours_limit'].sum():.1f} GPU-hours (the jobs' time limits)"
          + (f", projected {(df['projected_run_s'] * df['gpus']).sum() / 3600:.3f} GPU-hours of run time"
             if "projected_run_s" in df else ""))


def snapshot(directory: Path) -> tuple[Path | None, set[str]]:
    """(the highest folder from `directory` up that does not exist yet or None, the names in `directory` now)."""
    missing = None
    for p in (directory, *directory.parents):
        if p.exists():
            break
        missing = p
    return missing, {p.name for p in directory.iterdir()} if missing is None and directory.is_dir() else set()


def remove_new(directory: Path, before: tuple[Path | None, set[str]]) -> None:
    """Remove what was made in `directory` since `snapshot(directory)` returned `before`: the names new in it, or
    the whole folder and the empty parents made with it."""
    missing, names = before
    if missing is None:
        for p in directory.iterdir() if directory.is_dir() else ():
            if p.name not in names:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    shutil.rmtree(directory, ignore_errors=True)
    for p in directory.parents:  # up to the first that existed; a parent another process wrote into stays
        if p == missing.parent or any(p.iterdir()):
            break
        p.rmdir()


# Hydra's launcher logs "Launching N jobs locally"; under plan=true its jobs only plan, so the line is left out
LAUNCHER_LOG = logging.getLogger("hydra._internal.core_plugins.basic_launcher")


class PrintComparison(Callback):
    """plan=true runs no job, yet Hydra makes each job's folder (its .hydra/ and log) before the job starts:
    the folders this sweep or run made are removed once the plan is printed. A point folder that existed
    before keeps its records."""

    def __init__(self):
        self.before: tuple[Path | None, set[str]] = (None, set())

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.before = snapshot(Path(config.hydra.run.dir))
        self.sweep = Sweep.start()

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        planned = self.sweep.planned
        Sweep.close()
        if planned and self.before[0] is not None:  # a run folder that existed before is left as it is
            remove_new(Path(config.hydra.run.dir), self.before)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.before = snapshot(Path(config.hydra.sweep.dir))
        self.sweep = Sweep.start()
        if config.get("plan"):
            LAUNCHER_LOG.setLevel(logging.WARNING)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = self.sweep
        Sweep.close()
        if sweep.planned:
            print_plan(sweep.planned)
            remove_new(Path(config.hydra.sweep.dir), self.before)
            return
        if sweep.pending:  # Slurm jobs of this sweep still queued or running
            from harness.slurm import wait_all

            print(f"waiting for {len(sweep.pending)} Slurm jobs ...", flush=True)
            wait_all(sweep.pending)
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
