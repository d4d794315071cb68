from tests.conftest import run_cli


def test_default_run_leaves_an_ok_record_with_measured_tpot(tmp_path):
    proc, records = run_cli([], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(records) >= 1
    for rec in records:
        assert rec["status"] == "ok"
        assert rec["metrics"]["mean_tpot_ms"] > 0
        assert len(rec["step_times_ms"]) == rec["config"]["workload"]["output_tokens"] - 1
        assert rec["config"]["model"]["name"] == "tiny"
    assert "TPOT" in proc.stdout


def test_invalid_config_is_recorded_and_refused_before_launch(tmp_path):
    proc, records = run_cli(["workload.output_tokens=1"], tmp_path)
    assert proc.returncode != 0
    assert [r["status"] for r in records] == ["invalid"]
    assert "output_tokens" in records[0]["error"]
    assert not records[0]["metrics"]


def test_cli_static_tp2_pp2_end_to_end(tmp_path):
    proc, records = run_cli(["strategy=tp2_pp2", "check_reference=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (rec,) = records
    assert rec["status"] == "ok" and rec["reference_check"]["tokens_equal"]
    assert rec["env"]["world_size"] == 4 and rec["env"]["dist_backend"] == "gloo"
    assert set(rec["memory"]) == {"stage0", "stage1"}


def test_paper_scale_presets_validate():
    from harness.config import validate
    from tests.conftest import cfg_object

    for name, world in (("tp8_pp2", 16), ("tp16_pp2", 32), ("tp8_pp4", 32), ("fa_pool", 40), ("fa_pool_iso16", 16)):
        cfg = cfg_object([f"strategy={name}", "model=paper"])
        validate(cfg)
        assert cfg.strategy.world_size == world


def test_cli_fa_pool_end_to_end_with_breakdown_and_elasticity(tmp_path):
    proc, records = run_cli(["strategy=fa_pool_b2_p4", "check_reference=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (rec,) = records
    assert rec["status"] == "ok" and rec["reference_check"]["tokens_equal"]
    for role in ("base", "pool"):
        assert abs(sum(rec["breakdown"][role].values()) - 1) < 1e-9
    assert len(rec["pool_utilization"]) == 4
    assert rec["elasticity"][-1]["step"] == "finish"
