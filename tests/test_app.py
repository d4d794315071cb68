from tests.conftest import run_cli


def test_default_run_is_a_comparison_with_a_table_and_ok_records(tmp_path):
    proc, records = run_cli([], tmp_path)
    assert proc.returncode == 0, proc.stderr
    points = {(r["config"]["strategy"]["name"], r["config"]["workload"]["name"]) for r in records}
    assert points == {(s, w) for s in ("reference", "tp2_pp2", "fa_pool_b2_p2") for w in ("tiny_short", "tiny_long")}
    for rec in records:
        assert rec["status"] == "ok", rec["error"]
        m = rec["metrics"]
        for key in ("ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "tps", "decode_tps",
                    "tps_per_gpu", "num_gpus"):
            assert m[key] is not None and m[key] > 0, key
        assert len(rec["step_times_ms"]) == rec["config"]["workload"]["output_tokens"] - 1
        assert rec["memory"] and rec["breakdown"]
    assert "TPOT speed-up vs ref" in proc.stdout and "fa_pool_b2_p2" in proc.stdout


def test_invalid_config_is_recorded_and_refused_before_launch(tmp_path):
    proc, records = run_cli(["hydra.mode=RUN", "workload.output_tokens=1"], tmp_path)
    assert proc.returncode != 0
    assert [r["status"] for r in records] == ["invalid"]
    assert "output_tokens" in records[0]["error"]
    assert not records[0]["metrics"]


def test_cli_static_tp2_pp2_end_to_end(tmp_path):
    proc, records = run_cli(["strategy=tp2_pp2", "workload=tiny", "check_reference=true"], tmp_path)
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
    proc, records = run_cli(["strategy=fa_pool_b2_p4", "workload=tiny_mixed", "check_reference=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (rec,) = records
    assert rec["status"] == "ok" and rec["reference_check"]["tokens_equal"]
    for role in ("base", "pool"):
        assert abs(sum(rec["breakdown"][role].values()) - 1) < 1e-9
    assert len(rec["pool_utilization"]) == 4
    assert rec["elasticity"][-1]["step"] == "finish"
