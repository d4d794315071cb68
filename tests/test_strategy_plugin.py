"""A strategy kind added without editing the harness (tests/toy_strategy.py: config, engine, cost, memory) runs end
to end: through the fapool-bench command on CPU ranks (checked against the reference), the report, and
launcher=model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_app

# the fapool-bench command with the user's module imported first, as a user's own entry point would
COMMAND = [sys.executable, "-c", "import sys, runpy, tests.toy_strategy; sys.argv[0] = 'fapool-bench'; "
           "runpy.run_module('harness.app', run_name='__main__')"]


def bench(args, tmp_path, run="run"):
    proc = subprocess.run([*COMMAND, *args, f"hydra.run.dir={tmp_path}/{run}", f"hydra.sweep.dir={tmp_path}/sweep"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, [json.loads(p.read_text()) for p in sorted(Path(tmp_path).rglob("result.json"))]


def bench_here(args, tmp_path):
    """The same command's entry called in this process, the user's module imported into it first."""
    import tests.toy_strategy  # noqa: F401

    return run_app(args, tmp_path)


@pytest.mark.slow
def test_a_kind_registered_outside_the_harness_runs_and_matches_the_reference(tmp_path):
    proc, (rec,) = bench(["hydra.mode=RUN", "strategy=replica", "workload=tiny", "model.init_std=0.3",
                          "check_reference=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert rec["status"] == "ok" and rec["config"]["strategy"]["kind"] == "toy_replica", rec["error"]
    check = rec["reference_check"]
    assert check["passed"] and check["tokens_equal"] and check["max_rel_logit_error"] < 1e-4


def test_its_schema_refuses_another_kinds_field(tmp_path):
    proc, records = bench_here(["hydra.mode=RUN", "strategy=replica", "strategy.kv_shards=2"], tmp_path)
    assert proc.returncode != 0 and "strategy.kv_shards" in proc.stderr and not records


def test_it_is_projected_and_reported_beside_fa_pool(tmp_path):
    import tests.toy_strategy  # noqa: F401  (this process reads its records too)
    from harness.calibration import default_calibration
    from harness.config import from_dict
    from harness.perfmodel import predict_step
    from harness.report import report

    paper = ["hydra.mode=RUN", "launcher=model", "hardware=a100_80gb", "model=paper", "workload=len2048",
             "workload.batch_size=8"]
    for run, strategy in (("toy", ["strategy=replica", "strategy.step_scale=2"]), ("fa_pool", ["strategy=fa_pool_b2_p2"])):
        proc, _ = bench_here([*paper, *strategy], tmp_path / "runs" / run)
        assert proc.returncode == 0, proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").rglob("result.json"))]
    assert len(records) == 2
    toy = next(r for r in records if r["config"]["strategy"]["kind"] == "toy_replica")
    assert toy["status"] == "ok" and toy["env"]["source"] == "projected"
    # the record's step is the toy's own price (step_scale=2 doubles one GPU's step)
    cfg = from_dict(toy["config"])
    expected = predict_step(cfg, default_calibration())["step_s"] * 1e3
    assert toy["step_times_ms"][0] == pytest.approx(expected) and toy["memory"]["replica"]["weight_bytes_max"] > 0
    one_gpu = predict_step(from_dict({**toy["config"], "strategy": {**toy["config"]["strategy"], "step_scale": 1.0}}),
                           default_calibration())["step_s"] * 1e3
    assert expected == pytest.approx(2 * one_gpu)
    tables = report(tmp_path / "runs", tmp_path / "report")["tables"]
    against = tables["static_vs_fapool"]
    assert list(against["static"]) == ["replica"] and list(against["family"]) == ["toy_replica"]
    assert "replica" in set(tables["memory"].get("role", []))
