"""One table from several calls of the multi-GPU benchmark (harness/bench_multi.py) on one machine kind.

    python -m harness.bench_summary <set> <call> <call> ...

Calls are named oldest first. A row is (run, context, batch, captured or eager, synthetic KV or a real
prefill): the newest call that has it gives it, so a rerun replaces what it reran and an eager run stays beside a captured one. `graphs` comes from
the record (any rank replaying CUDA graphs), `n/a` where a call's records were not brought back (any later
call's row of the point replaces such a row). The speed-up is
over the fastest static TP x PP row (strategy kind reference or static) of the same point and GPU count. Writes DIR/summary.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.bench_multi import STATIC, catalog, family
from harness.benchlib import md_table

COLUMNS = ["context", "batch", "gpus", "run", "graphs", "tpot_ms", "median_tpot_ms", "decode_tps_per_gpu", "roofline_ms",
           "ratio", "median_ratio", "speedup_vs_best_static", "call"]


def _record(call_dir: Path, row: dict) -> dict | None:
    rec = call_dir / "records" / row.get("tag", f"{row['run']}_L{row['context']}_B{row['batch']}") / "result.json"
    return json.loads(rec.read_text()) if rec.exists() else None


def _graphs(record: dict | None) -> str:
    if record is None:
        return "n/a"
    return "yes" if any(r.get("cuda_graphs") for r in record.get("ranks") or []) else "no (eager)"


def kind_of(row: dict, record: dict | None) -> str | None:
    """The row's strategy kind: the row's own (bench_multi writes it), else its record's config, else the kind of
    the run's experiment preset (calls whose records were not brought back), else None."""
    return row.get("kind") or family(record or {}) or (catalog().get(row["run"]) or {}).get("kind")


def is_static(row: dict) -> bool:
    return row.get("kind") in STATIC


def summarize(set_dir: Path, calls: list[str]) -> list[dict]:
    rows = {}
    for call in calls:
        call_dir = set_dir / call
        for row in json.loads((call_dir / "bench_multi.json").read_text())["rows"]:
            if row.get("status") != "ok":
                continue
            record = _record(call_dir, row)
            graphs = _graphs(record)
            kv = "real prefill" if row.get("tag", "").endswith("_prefill") else "synthetic"  # a point apart
            if graphs != "n/a":  # a rerun whose record says how it ran replaces one whose record is missing
                rows.pop((row["run"], row["context"], row["batch"], None, kv), None)
            median = row.get("median_tpot_ms")
            eager = None if graphs == "n/a" else graphs.startswith("no")
            rows[(row["run"], row["context"], row["batch"], eager, kv)] = {
                **row, "kind": kind_of(row, record), "graphs": graphs, "call": call, "kv": kv,
                "median_ratio": median / row["roofline_ms"] if median and row.get("roofline_ms") else None}
    out = sorted(rows.values(), key=lambda r: (r["kv"], r["context"], r["batch"], r["gpus"], r["run"], r["graphs"]))
    for r in out:
        static = [o["tpot_ms"] for o in out if is_static(o) and
                  (o["context"], o["batch"], o["gpus"], o["kv"]) == (r["context"], r["batch"], r["gpus"], r["kv"])]
        r["speedup_vs_best_static"] = min(static) / r["tpot_ms"] if static else None
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        sys.exit("usage: python -m harness.bench_summary SET_DIR CALL [CALL ...] (oldest first)")
    set_dir = Path(argv[0])
    rows = summarize(set_dir, argv[1:])
    prefill = any(r["kv"] == "real prefill" for r in rows)  # then which rows had one, and their TTFT
    (set_dir / "summary.md").write_text(md_table(rows, ["kv", *COLUMNS[:5], "ttft_ms", *COLUMNS[5:]] if prefill else COLUMNS))
    print(f"{len(rows)} rows -> {set_dir / 'summary.md'}")


if __name__ == "__main__":
    main()
