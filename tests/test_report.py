"""Collector, tables, plots and the notebook, on a small results set the test makes itself."""
import json
import os
import subprocess
import sys

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from harness.collect import collect
from harness.record import RunRecord, write_record
from harness.report import load_claims, paper_layout, report, static_vs_fapool
from tests.conftest import ROOT, run_app

PLOTS = ["tpot_vs_length", "tps", "speedup", "pool_scaling", "threshold_sweep", "breakdown", "memory", "pareto", "elasticity"]


def _rec(strategy, kind, length, tpot, tps, gpus, source=None, status="ok", ranks=()):
    cfg = {"strategy": {"name": strategy, "kind": kind, "pool": {"size": 2, "threshold": 32}},
           "workload": {"name": f"len{length}", "prompt_lens": [length], "buckets": []}}
    env = {"source": source} if source else {}
    metrics = {} if status != "ok" else {"mean_tpot_ms": tpot, "tps": tps, "decode_tps": 1000 / tpot, "num_gpus": gpus,
                                         "tps_per_gpu": tps / gpus}
    return RunRecord(run_id=f"{strategy}{length}{source}", status=status, config=cfg, env=env, metrics=metrics,
                     breakdown={"base": {"attention": 0.5, "communication": 0.2, "synchronization": 0.1,
                                         "resource_management": 0.05, "other": 0.15}} if status == "ok" else {},
                     memory={"base": {"peak_bytes_max": 2e9, "source": "test"}} if status == "ok" else {},
                     ranks=list(ranks))


@pytest.fixture
def results(tmp_path):
    runs = [("tp8_pp2", "static", 8192, 245.0, 33.0, 16), ("fa_pool", "fa_pool", 8192, 100.0, 80.0, 40),
            ("tp16_pp2", "static", 8192, 200.0, 40.0, 32), ("tp8_pp2", "static", 512, 45.0, 22.0, 16),
            ("fa_pool", "fa_pool", 512, 50.0, 20.0, 40), ("fa_pool_iso16", "fa_pool", 8192, 150.0, 50.0, 16),
            ("dcp_t8_k8_pp2", "dcp", 8192, 125.0, 66.0, 16)]
    timeline = lambda compute, idle: {"profile": {"timeline": {"window_ms": 10.0, "compute_ms": compute, "nccl_only_ms":
                                                               10.0 - compute - idle, "idle_ms": idle,
                                                               "compute_share": compute / 10.0}}}
    # a profiled pipeline: two ranks of stage 0 and one of stage 1 (a role's ranks are averaged)
    write_record(_rec("tp2_pp2", "static", 32768, 10.0, 90.0, 4, ranks=[
        {"role": "stage0", **timeline(9.0, 0.2)}, {"role": "stage0", **timeline(8.0, 0.4)},
        {"role": "stage1", **timeline(9.5, 0.1)}, {"role": "stage1"}]), tmp_path / "profiled")
    for i, r in enumerate(runs):
        write_record(_rec(*r), tmp_path / f"run{i}")
    write_record(_rec("fa_pool", "fa_pool", 8192, 10.0, 800.0, 40, source="projected"), tmp_path / "proj")
    write_record(_rec("tp8_pp2", "static", 8192, 40.0, 200.0, 16, source="projected"), tmp_path / "proj2")
    write_record(_rec("tp8_pp2", "static", 2048, 0, 0, 16, status="failed"), tmp_path / "failed")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "result.json").write_text('{"run_id": "x", "status": "ok", "conf')
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "result.json").write_text(json.dumps({"schema_version": 99, "run_id": "y", "status": "ok"}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "result.json").write_text("")
    return tmp_path


def test_collector_loads_good_rows_and_lists_bad_ones(results):
    df, bad = collect(results)
    assert len(df) == 11 and set(df["status"]) == {"ok", "failed"}
    reasons = {p.parent.name: why for p, why in bad}
    assert set(reasons) == {"trunc", "future", "empty"}
    assert "JSONDecodeError" in reasons["trunc"] and "schema_version 99" in reasons["future"]
    assert "empty" in reasons["empty"]


def test_speedups_equal_hand_computed_ratios_and_sources_never_mix(results):
    df, _ = collect(results)
    lay = paper_layout(df, load_claims()).set_index(["source", "seq_len"])
    assert lay.loc[("measured", 8192), "tpot_speedup"] == pytest.approx(245 / 100)
    assert lay.loc[("measured", 8192), "tps_speedup"] == pytest.approx(80 / 33)
    assert lay.loc[("measured", 512), "tpot_speedup"] == pytest.approx(45 / 50)
    assert lay.loc[("projected", 8192), "tpot_speedup"] == pytest.approx(40 / 10)
    assert lay.loc[("measured", 8192), "claim_tpot_speedup"] == 2.1  # the paper's, beside ours
    sv = static_vs_fapool(df).set_index(["source", "static", "seq_len"])
    assert sv.loc[("measured", "tp16_pp2", 8192), "tpot_speedup"] == pytest.approx(200 / 100)
    assert ("projected", "tp16_pp2", 8192) not in sv.index
    # DCP is a baseline family beside static TP x PP
    assert sv.loc[("measured", "dcp_t8_k8_pp2", 8192), "tpot_speedup"] == pytest.approx(125 / 100)
    assert sv.loc[("measured", "dcp_t8_k8_pp2", 8192), "family"] == "dcp"
    assert sv.loc[("measured", "tp16_pp2", 8192), "family"] == "static"


def test_every_table_and_plot_is_written_and_not_empty(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report(results, out)
    for name in PLOTS:
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name
    for name in ("paper_layout", "static_vs_fapool", "iso_gpu", "memory", "breakdown", "timeline"):
        assert (out / f"{name}.md").read_text().count("|") > 10, name
        assert "tabular" in (out / f"{name}.tex").read_text()
    assert len(pd.read_parquet(out / "results.parquet")) == 11
    assert "trunc" in (out / "skipped.txt").read_text()


def test_the_profiled_timeline_per_role_is_the_mean_of_its_ranks(results):
    from harness.report import timeline_table

    t = timeline_table(collect(results)[0]).set_index("role")
    assert list(t.index) == ["stage0", "stage1"]  # only the profiled run has rows
    assert t.loc["stage0", "compute_ms"] == pytest.approx(8.5) and t.loc["stage0", "idle_ms"] == pytest.approx(0.3)
    assert t.loc["stage1", "nccl_only_ms"] == pytest.approx(0.4)


def test_claims_cite_their_sections():
    claims = load_claims()
    assert claims["section"].notna().all() and len(claims) >= 30
    assert claims.loc[claims["claim_id"] == "tpot_base_16384", "value"].item() == 892


def test_notebook_is_paired_and_executes(results, tmp_path, monkeypatch):
    nb_path = ROOT / "notebooks" / "analysis.ipynb"
    import jupytext

    # what `jupytext --to ipynb analysis.py` writes, made in this process
    fresh, committed = jupytext.read(ROOT / "notebooks" / "analysis.py"), nbformat.read(nb_path, 4)
    assert [c.source for c in fresh.cells] == [c.source for c in committed.cells], "run: jupytext --sync notebooks/analysis.py"
    git_status = ["git", "-C", str(ROOT), "status", "--porcelain"]
    before = subprocess.run(git_status, capture_output=True, text=True, check=True).stdout
    # the records the test made, the output folder left at its default; the kernel imports this checkout
    monkeypatch.setenv("FAPOOL_RESULTS", str(results))
    monkeypatch.delenv("FAPOOL_REPORT_OUT", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    NotebookClient(committed, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = "".join(str(o) for c in committed.cells for o in c.get("outputs", []))
    assert "11 records" in outputs and "image/png" in outputs and "Where a decode step goes" in outputs
    # it wrote its report into the git-ignored default folder, and nothing git tracks or would list changed
    assert str(results) in (ROOT / "results" / "notebook" / "report" / "results.csv").read_text()
    assert subprocess.run(git_status, capture_output=True, text=True, check=True).stdout == before
    assert "40 trace replays" in outputs  # the committed projected set of the paper's configurations under traffic


def test_fapool_report_command_on_a_real_sweep(tmp_path):
    proc, records = run_app(["-m", "launcher=model", "hardware=a100_80gb", "model=paper", "strategy=tp8_pp2,fa_pool",
                             "workload=len2048,len16384", "workload.batch_size=64"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(records) == 4 and all(r["env"]["source"] == "projected" for r in records)
    sweep = tmp_path / "sweep"
    assert (sweep / "report" / "paper_layout.md").exists()  # written at the end of the multirun
    out = subprocess.run([sys.executable, "-m", "harness.report", str(sweep), "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "4 records loaded, 0 skipped" in out.stdout and "projected" in out.stdout


def test_unlike_records_are_not_averaged_and_the_tables_say_why(tmp_path):
    """Two batch sizes of the same strategies and length: separate rows (not a mean of unlike runs), and the
    tables name the field that split them."""
    for batch, static_tpot in ((4, 200.0), (64, 400.0)):
        for strategy, kind, tpot, gpus in (("tp8_pp2", "static", static_tpot, 16), ("fa_pool", "fa_pool", 100.0, 40)):
            rec = _rec(strategy, kind, 8192, tpot, 10.0, gpus)
            rec.config["workload"]["batch_size"] = batch
            write_record(rec, tmp_path / f"{strategy}_{batch}")
    df, _ = collect(tmp_path)
    lay = paper_layout(df, load_claims())
    assert sorted(lay["tpot_speedup"]) == [pytest.approx(2.0), pytest.approx(4.0)]  # a mean would give 3.0 once
    assert sorted(static_vs_fapool(df)["tpot_speedup"]) == [pytest.approx(2.0), pytest.approx(4.0)]
    r = report(tmp_path, tmp_path / "rep")
    assert len(r["tables"]["memory"]) == 4 and len(r["tables"]["breakdown"]) == 4
    for name in ("paper_layout", "static_vs_fapool", "memory", "breakdown"):
        assert "split by workload.batch_size" in (tmp_path / "rep" / f"{name}.md").read_text(), name


def test_a_missing_results_directory_is_an_error_not_an_empty_report(tmp_path):
    from harness.perfmodel_check import main as perfmodel_main
    from harness.report import main as report_main

    for main in (report_main, perfmodel_main):
        with pytest.raises(SystemExit, match="is not a directory"):
            main([str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("module", ["harness.report", "harness.perfmodel_check"])
def test_a_missing_results_directory_exits_non_zero_naming_it(tmp_path, module):
    proc = subprocess.run([sys.executable, "-m", module, str(tmp_path / "typo")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{tmp_path / 'typo'} is not a directory" in proc.stderr


def test_perfmodel_on_a_set_without_gpu_records_says_why_its_table_is_empty(capsys):
    from harness.perfmodel_check import main as perfmodel_main

    perfmodel_main([str(ROOT / "results" / "measured" / "cpu")])
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("(empty:")]
    assert "holds no ok measured GPU record" in line and "3 result.json found: 3 ran on CPU" in line
    assert "| record | strategy |" not in out


def _figures(monkeypatch, root, out):
    """The report's figures by name, kept open (harness.report._save closes them once saved)."""
    import harness.report as rep

    figs = {}

    def keep(fig, out, name):
        figs[name] = fig
        return []

    monkeypatch.setattr(rep, "_save", keep)
    collected, _ = collect(root)
    rep.plot_all(collected, load_claims(), out)
    return figs


def test_plots_of_a_cpu_set_label_hardware_whole_ranks_and_no_claim_bar(monkeypatch, tmp_path):
    figs = _figures(monkeypatch, ROOT / "results" / "measured" / "cpu", tmp_path)
    assert "measured on cpu; paper claims: A100" in figs["tpot_vs_length"].axes[0].get_title()
    ax = figs["elasticity"].axes[0]
    ranks = [y for line in ax.get_lines() for y in line.get_ydata()]
    assert ranks and all(float(y).is_integer() for y in ranks)  # pool ranks per sequence, not offset
    assert all(float(t).is_integer() for t in ax.get_yticks())
    legend = [t.get_text() for t in figs["speedup"].axes[0].get_legend().get_texts()]
    assert legend and not any("paper claim" in t for t in legend)  # no claim at these lengths, no claim entry
    assert [t.get_text() for t in figs["pareto"].axes[0].texts] == ["42", "42"]  # each point names its length


def test_plots_of_the_paper_grid_label_points_and_keep_tick_labels_short(monkeypatch, tmp_path):
    figs = _figures(monkeypatch, ROOT / "results" / "projected" / "paper_table", tmp_path)
    legend = [t.get_text() for t in figs["speedup"].axes[0].get_legend().get_texts()]
    assert "paper claim (A100 80GB)" in legend
    assert sorted({t.get_text() for t in figs["pareto"].axes[0].texts}) == ["16K", "2K", "512", "8K"]
    ticks = [t.get_text() for t in figs["breakdown"].axes[0].get_xticklabels()]
    assert "fa_pool:pool 16K" in ticks and not any("\n" in t for t in ticks)


def test_perfmodel_check_leaves_trace_replays_to_its_serving_table(capsys):
    """A set holding both static-batch records and trace replays (which have no TPOT mean): the static check
    prices the static records and leaves the replays out."""
    from harness.perfmodel_check import main as perfmodel_main

    perfmodel_main([str(ROOT / "results" / "measured" / "h100-x1")])
    out = capsys.readouterr().out
    assert "| graphed L=" in out and "serve_closed" not in out


def test_perfmodel_prefill_check_shows_records_of_a_replaced_engine_and_leaves_them_out_of_its_summary(tmp_path):
    """A call's invalid.json {"prefill:<kind>": why}: that kind's records of the call keep their row, which says why,
    and the summary is taken over the others; the same records without the file count again."""
    import shutil

    from harness.perfmodel_check import check_prefill, summarize

    src = ROOT / "results" / "measured" / "h200-x2" / "bench"
    for call in ("call_e_prefill", "call_f_prefill"):
        shutil.copytree(src / call, tmp_path / call)
    rows = check_prefill(tmp_path)
    dcp = [r for r in rows if r["strategy"] == "dcp_t2_k2"]
    assert len(dcp) == 4 and all("mask" in r["superseded"] for r in dcp)
    assert all(not r["superseded"] for r in rows if r["strategy"].startswith("tp"))  # no marker for their kind
    assert "dcp_t2_k2" not in [s["strategy"] for s in summarize(rows)]
    assert "tp2_pp1" in [s["strategy"] for s in summarize(rows)]
    for call in ("call_e_prefill", "call_f_prefill"):
        (tmp_path / call / "invalid.json").unlink()
    again = summarize(check_prefill(tmp_path))
    assert [s["records"] for s in again if s["strategy"] == "dcp_t2_k2"] == [4]


def test_perfmodel_summary_per_kind_takes_every_configuration_of_a_kind_together():
    from harness.perfmodel_check import summarize

    def row(strategy, kind, err, basis="median", calibration=False):
        return {"strategy": strategy, "kind": kind, "rel_error": err, "basis": basis, "calibration": calibration}

    rows = [row("fa_pool_b1_p3_pmb2", "fa_pool", 0.077), row("fa_pool_b2_p2_pmb2", "fa_pool", 0.113),
            row("fa_pool_b2_p2", "fa_pool", -0.5, calibration=True), row("tp4_pp1", "static", -0.037),
            row("tp2_pp2", "static", 0.2, basis="median, eager steps")]
    per_strategy = {s["strategy"]: s for s in summarize(rows)}
    assert per_strategy["fa_pool_b2_p2_pmb2"]["median_abs_error"] == pytest.approx(0.113)
    per_kind = {s["strategy"]: s for s in summarize(rows, by="kind")}
    assert set(per_kind) == {"fa_pool", "static", "static (eager steps)"}
    assert per_kind["fa_pool"]["records"] == 2  # the calibration record left out
    assert per_kind["fa_pool"]["median_abs_error"] == pytest.approx(0.095)
    assert per_kind["fa_pool"]["max_abs_error"] == pytest.approx(0.113)
