"""The end-of-sweep console table (harness/callbacks.py) on records the test makes, and plan=true's folders."""
import pandas as pd

from harness.callbacks import comparison_table
from tests.conftest import run_app


def _row(strategy, kind, workload, tpot, **config):
    return {"config.strategy.name": strategy, "config.strategy.kind": kind, "config.workload.name": workload,
            "status": "ok", "metrics.mean_tpot_ms": tpot, **{f"config.{k}": v for k, v in config.items()}}


def _body(table: str) -> list[list[str]]:
    """The table's rows (header and rule left out) as lists of stripped cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:] if line.startswith("|")]


def test_a_swept_field_of_one_preset_gets_a_column_and_its_own_reference():
    rows = [_row(s, k, w, tpot * (2 if k == "reference" else 1), **{"workload.output_tokens": tpot,
                                                                     "strategy.tp": 1 if k == "reference" else 2})
            for s, k in (("reference", "reference"), ("tp2_pp1", "static")) for w in ("tiny_short", "tiny_long")
            for tpot in (8, 16)]
    table = comparison_table(pd.DataFrame(rows))
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header[:3] == ["strategy", "workload", "workload.output_tokens"]
    assert "strategy.tp" not in header  # it follows from the strategy's name
    body = _body(table)
    assert len({tuple(r[:3]) for r in body}) == len(body) == 8  # no two rows alike
    speedup = header.index("TPOT speed-up vs ref")
    assert {r[speedup] for r in body if r[0] == "tp2_pp1"} == {"2"}  # each against the reference of its own tokens


def test_no_reference_shows_a_dash_and_says_why():
    table = comparison_table(pd.DataFrame([_row("tp2_pp1", "static", "tiny", 5.0)]))
    body = _body(table)
    assert body[0][-1] == "-" and "nan" not in table
    assert table.splitlines()[-1].startswith("- in 'TPOT speed-up vs ref': this sweep has no ok reference run")


def test_lengths_sort_by_value_not_as_text():
    rows = [_row("tp8_pp2", "static", f"len{n}", 1.0) for n in (16384, 2048, 512, 8192)]
    assert [r[1] for r in _body(comparison_table(pd.DataFrame(rows)))] == ["len512", "len2048", "len8192", "len16384"]


def test_plan_mode_prints_the_plan_and_leaves_no_folder(tmp_path):
    proc, records = run_app(["plan=true"], tmp_path)  # the default sweep of 6 points
    assert proc.returncode == 0, proc.stderr
    assert "Plan (nothing was submitted or run)" in proc.stdout and "total: 6 jobs" in proc.stdout
    assert "Launching" not in proc.stdout + proc.stderr
    assert records == [] and list(tmp_path.iterdir()) == []
    proc, _ = run_app(["hydra.mode=RUN", "plan=true"], tmp_path)
    assert proc.returncode == 0 and "PLAN {'strategy': 'reference'" in proc.stdout, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_plan_mode_keeps_what_a_sweep_folder_held_before(tmp_path):
    kept = tmp_path / "sweep" / "0_reference_tiny_short" / "result.json"
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    proc, _ = run_app(["plan=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0_reference_tiny_short"]
    assert kept.read_text() == "{}"
