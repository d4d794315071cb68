"""harness/bench_summary.py: one table from several benchmark calls, newest call first per row."""
import json

import pytest

from harness.bench_summary import summarize


def _call(root, name, rows, graphs):
    d = root / name
    d.mkdir()
    (d / "bench_multi.json").write_text(json.dumps({"rows": rows}))
    for row, g in zip(rows, graphs):
        if g is None:
            continue  # records not brought back
        rec = d / "records" / f"{row['run']}_L{row['context']}_B{row['batch']}" / "result.json"
        rec.parent.mkdir(parents=True)
        rec.write_text(json.dumps({"ranks": [{"cuda_graphs": g}]}))


def row(run, tpot, gpus=4, status="ok"):
    return {"run": run, "context": 8192, "batch": 16, "gpus": gpus, "status": status, "tpot_ms": tpot,
            "median_tpot_ms": tpot, "roofline_ms": 1.0}


def test_newer_calls_replace_rows_and_eager_stays_beside_captured(tmp_path):
    _call(tmp_path, "old", [row("tp4", 2.0), row("tp2_pp2", 3.0), row("fa_pool_b2_p2", 9.0)], [None, None, False])
    _call(tmp_path, "new", [row("tp4", 1.5), row("fa_pool_b2_p2", 3.0), row("dcp_t4_k4", 1.0),
                            row("tp2_pp2", 0.1, status="failed")], [True, True, True, True])
    out = {(r["run"], r["graphs"]): r for r in summarize(tmp_path, ["old", "new"])}
    assert set(out) == {("tp4", "yes"), ("tp2_pp2", "n/a"), ("fa_pool_b2_p2", "no (eager)"), ("fa_pool_b2_p2", "yes"),
                        ("dcp_t4_k4", "yes")}  # the failed rerun leaves the old row; tp4's rerun replaces it
    assert out[("tp4", "yes")]["call"] == "new" and out[("tp2_pp2", "n/a")]["call"] == "old"
    # over the fastest static TP x PP of the point (tp4's 1.5 ms); DCP and FA Pool are not static
    assert out[("dcp_t4_k4", "yes")]["speedup_vs_best_static"] == pytest.approx(1.5)
    assert out[("fa_pool_b2_p2", "yes")]["speedup_vs_best_static"] == pytest.approx(0.5)


def test_a_real_prefill_row_is_a_point_of_its_own(tmp_path):
    """A call with a real prefill (tags ending `_prefill`) neither replaces the synthetic-KV rows of its point nor
    counts as their static baseline."""
    _call(tmp_path, "decode", [row("tp4", 2.0)], [True])
    prefill = [{**row("tp4", 1.0), "tag": "tp4_L8192_B16_prefill", "ttft_ms": 180.0},
               {**row("fa_pool_b1_p3", 4.0), "tag": "fa_pool_b1_p3_L8192_B16_prefill", "ttft_ms": 690.0}]
    _call(tmp_path, "prefill", prefill, [None, None])
    out = {(r["run"], r["kv"]): r for r in summarize(tmp_path, ["decode", "prefill"])}
    assert set(out) == {("tp4", "synthetic"), ("tp4", "real prefill"), ("fa_pool_b1_p3", "real prefill")}
    assert out[("tp4", "synthetic")]["tpot_ms"] == 2.0 and out[("tp4", "real prefill")]["ttft_ms"] == 180.0
    assert out[("fa_pool_b1_p3", "real prefill")]["speedup_vs_best_static"] == pytest.approx(0.25)  # over 1.0
