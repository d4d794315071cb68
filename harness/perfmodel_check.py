"""`fapool-perfmodel`: the performance model against measured records, as tables (predicted vs measured TPOT
and TTFT per record, and per strategy the median and max error of the validation records)."""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from harness.calibration import (CALIBRATION_SET, MEASURED_SET, Calibration, invalid_of, record_key, uniform_step_s,
                                 default_calibration, measured_items, record_config, set_calibration, with_limits)
from harness.perfmodel import predict_step
from harness.strategies import spec_of
from model.config import PRESETS

def calibrated_items(root) -> tuple[list, Calibration | None]:
    """The measured GPU records under root, and the calibration of their set (from the records of benchmark calls,
    those with a limits.json; None without any)."""
    items = measured_items(root)
    keyed = {record_key(path, root): (rec, lim) for path, rec, lim in items if lim is not None}
    if not keyed:
        return items, None
    # What a set holds no records to fit (FA Pool's host costs of an eager exchange and an eager unit, the prefill's
    # FLOP rate, FA Pool's prefill copy rates) it takes from the committed calibration: these belong to the host,
    # NCCL, the GPU's kernels and today's engines, not to a set. Records of an engine since replaced say so in their
    # call's invalid.json (check_prefill).
    committed = default_calibration()
    base = dataclasses.replace(Calibration.from_bench(), message_s=committed.message_s,
                               eager_unit_s=dict(committed.eager_unit_s),
                               prefill_flops_fraction=committed.prefill_flops_fraction,
                               prefill_pool_copy_bw_fraction=committed.prefill_pool_copy_bw_fraction,
                               prefill_base_copy_bw_fraction=committed.prefill_base_copy_bw_fraction)
    return items, set_calibration(keyed, base)


def check(root: str | Path, calibrated: tuple | None = None) -> list[dict]:
    """Predicted vs measured TPOT for every measured GPU record under root. Records of a multi-GPU benchmark
    call (a limits.json above them) are predicted with their set's calibration (`set_calibration`) against the
    median step; older records (no limits.json: eager engines) with the default calibration, eagerly, against
    the mean. Rows of calibration records say so and stay out of the error statistics (`summarize`).
    calibrated: `calibrated_items(root)` when the caller has it already."""
    items, cal_set = calibrated or calibrated_items(root)
    rows = []
    for path, rec, lim in items:
        if "decode" in invalid_of(path):
            continue
        cfg = record_config(rec)
        name = record_key(path, root)
        if lim is None:
            pred, meas, basis = predict_step(cfg, default_calibration(), eager=True)["step_s"] * 1e3, rec.metrics["mean_tpot_ms"], "mean (eager engine)"
        else:
            graphed = all(r.get("cuda_graphs", False) for r in rec.ranks)  # what ran (older records do not say: eager)
            pred = predict_step(cfg, with_limits(cal_set, lim), graphed=graphed)["step_s"] * 1e3
            meas, basis = rec.metrics["median_tpot_ms"], "median" + ("" if graphed else ", eager steps")
        rows.append({"record": name, "strategy": cfg.strategy.name, "kind": cfg.strategy.kind, "workload": cfg.workload.name,
                     "batch": cfg.workload.batch_size, "measured_ms": meas, "measured_mean_ms": rec.metrics["mean_tpot_ms"],
                     "predicted_ms": pred, "rel_error": (pred - meas) / meas, "basis": basis,
                     "calibration": bool(cal_set) and name in cal_set.calibration_records})
    return rows


def check_prefill(root: str | Path, calibrated: tuple | None = None) -> list[dict]:
    """Predicted vs measured TTFT of every measured record under root with a real prefill, each with its set's
    calibration (as `check`); the one-GPU reference records calibrate the prefill's FLOP rate, two FA Pool records
    its copy rates (not validation). A record whose call's invalid.json has "prefill:<kind>" measured a prefill
    engine of that kind since replaced (the model prices today's): its row says why and validates nothing."""
    items, cal_set = calibrated or calibrated_items(root)
    rows = []
    for path, rec, lim in items:
        if lim is None or not rec.metrics.get("ttft_ms"):
            continue
        cfg = record_config(rec)
        pred = predict_step(cfg, with_limits(cal_set, lim))["prefill_s"] * 1e3
        meas = rec.metrics["ttft_ms"]
        name = record_key(path, root)
        rows.append({"record": name, "strategy": cfg.strategy.name, "kind": cfg.strategy.kind, "measured_ms": meas,
                     "predicted_ms": pred, "rel_error": (pred - meas) / meas, "basis": "ttft",
                     "calibration": spec_of(cfg.strategy).family == "reference" or name in cal_set.prefill_calibration_records,
                     "superseded": invalid_of(path).get(f"prefill:{cfg.strategy.kind}")})
    return rows


def summarize(rows: list[dict], by: str = "strategy") -> list[dict]:
    """Per strategy (by="strategy") or per strategy kind, TP/PP, DCP or FA Pool in all their configurations
    (by="kind"), over the validation rows (calibration rows, and records of an engine since replaced, left out):
    count, median and max |rel. error|; eager steps apart."""
    out = []
    group = lambda r: r[by] + (" (eager steps)" if "eager" in r["basis"] else "")  # noqa: E731
    for name in sorted({group(r) for r in rows}):
        errs = [abs(r["rel_error"]) for r in rows if group(r) == name and not r["calibration"] and not r.get("superseded")]
        if errs:
            out.append({"strategy": name, "records": len(errs), "median_abs_error": statistics.median(errs),
                        "max_abs_error": max(errs)})
    return out


def summary_table(rows: list[dict], by: str = "strategy") -> list[str]:
    """`summarize(rows, by)` as markdown lines: a header, then a line per group."""
    return [f"| {by} | records | median abs. error | max abs. error |", "|---|---|---|---|",
            *(f"| {x['strategy']} | {x['records']} | {x['median_abs_error']:.1%} | {x['max_abs_error']:.1%} |"
              for x in summarize(rows, by))]


def check_graphed(bench_json: Path = CALIBRATION_SET) -> list[dict]:
    """Predicted vs measured TPOT of the graphed single-GPU steps in the benchmark's own result set."""
    res = json.loads(Path(bench_json).read_text())
    cal = Calibration.from_bench(bench_json)
    lim = res["limits"]
    m = PRESETS[res["model"]]
    rows = []
    for r in res.get("decode_steps", []):
        if not r.get("graph") or r.get("backend") != "sdpa_cudnn" or "tpot_ms" not in r:
            continue
        pred = uniform_step_s(cal, m, lim, r, eager=False) * 1e3
        rows.append({"record": f"graphed L={r['context']} B={r['batch']}", "measured_ms": r["tpot_ms"],
                     "predicted_ms": pred, "rel_error": (pred - r["tpot_ms"]) / r["tpot_ms"]})
    return rows


def why_no_rows(root: str | Path) -> str:
    """One line: why `check` finds nothing under root (it checks only ok GPU measurements, the model's subject)."""
    from harness.collect import find_records

    good, bad = find_records(root)
    kinds = {"ran on CPU (mechanics, not GPU time)": 0, "projected": 0, "not ok": 0, "ok GPU records marked invalid": 0}
    for path, rec in good:
        if rec.status != "ok":
            kinds["not ok"] += 1
        elif rec.env.get("source", "measured") != "measured":
            kinds["projected"] += 1
        elif rec.config["hardware"]["device"] != "cuda":
            kinds["ran on CPU (mechanics, not GPU time)"] += 1
        else:
            kinds["ok GPU records marked invalid"] += 1
    found = ", ".join(f"{n} {k}" for k, n in kinds.items() if n) + (f", {len(bad)} unreadable" if bad else "")
    return (f"(empty: the model predicts GPU steps and {root} holds no ok measured GPU record to check it against; "
            f"{len(good) + len(bad)} result.json found{': ' + found if found else ''})")


def check_table(root: str | Path) -> str:
    """`check` and `summarize` as markdown, then `check_prefill`'s; the set calibrated once for both."""
    calibrated = calibrated_items(root)
    rows, prefill = check(root, calibrated), check_prefill(root, calibrated)
    if not rows and not prefill:
        return why_no_rows(root)
    lines = ["| record | strategy | measured TPOT ms (basis) | predicted ms | rel. error | |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["strategy"], r["record"])):
        lines.append(f"| {r['record']} | {r['strategy']} | {r['measured_ms']:.2f} ({r['basis']}) | {r['predicted_ms']:.2f} | "
                     f"{r['rel_error']:+.1%} | {'calibration' if r['calibration'] else ''} |")
    lines += ["", "Per strategy, calibration records left out:", "", *summary_table(rows)]
    lines += ["", "Per strategy kind (every configuration of it), calibration records left out:", "",
              *summary_table(rows, by="kind")]
    if prefill:
        lines += ["", "Prefill: TTFT of the records with a real prefill (the reference's calibrate the prefill's FLOP "
                  "rate, two FA Pool records its copy rates; records of a prefill engine since replaced say so, and the "
                  "summary leaves them out):", "", "| record | strategy | measured TTFT ms | predicted ms | rel. error | |", "|---|---|---|---|---|---|"]
        for r in sorted(prefill, key=lambda r: (r["strategy"], r["record"])):
            note = "calibration" if r["calibration"] else f"superseded engine: {r['superseded']}" if r["superseded"] else ""
            lines.append(f"| {r['record']} | {r['strategy']} | {r['measured_ms']:.0f} | {r['predicted_ms']:.0f} | "
                         f"{r['rel_error']:+.1%} | {note} |")
        lines += ["", *summary_table(prefill), "", *summary_table(prefill, by="kind")]
    return "\n".join(lines)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="predicted vs measured TPOT for the measured records under a directory")
    ap.add_argument("root", nargs="?", default=str(MEASURED_SET))
    ap.add_argument("--serving", action="store_true",
                    help="trace replays: each measured replay under root against its replay in virtual time")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        raise SystemExit(f"fapool-perfmodel: {args.root} is not a directory of records")
    if args.serving:
        from harness.serving.virtual import SERVING_BOUNDS, check_serving

        table = check_serving(args.root)
        skipped = "".join(f"\nleft out: {record}: {why}" for record, why in table.attrs.get("skipped", ()))
        if table.empty:
            print("(no measured trace replays found)" + skipped)
            return
        print(table.to_markdown(index=False, floatfmt=".3g"))
        bounds = ", ".join(f"|{name} error| <= {bound:.0%}" for name, bound in SERVING_BOUNDS.items())
        outside = table[~table["within bounds"]]
        print(f"\nwithin bounds ({bounds}): {len(table) - len(outside)} of {len(table)} replays" +
              ("" if outside.empty else "; outside: " + ", ".join(outside.record)) + skipped)
        return
    print(f"calibration: {default_calibration().source}")
    print(check_table(args.root))
    if CALIBRATION_SET.exists():
        rows = check_graphed()
        print("\n## graphed one-GPU steps of the benchmark (its own calibration set, not a validation)")
        for r in rows:
            print(f"| {r['record']} | {r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | {r['rel_error']:+.1%} |")


if __name__ == "__main__":
    main()
