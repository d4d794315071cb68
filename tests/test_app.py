"""The fapool-bench command: its default run through the real command (a Python of its own, as a user starts it);
the other cases call the same entry in this process (tests/conftest.run_app), each a fresh Hydra run."""
from tests.conftest import run_app, run_cli


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
        check = rec["reference_check"]  # the first thing a new user runs shows that the strategies agree
        assert check["passed"] and check["tokens_equal"] and check["max_abs_logit_error"] < 1e-4, check
    for rec in records:  # the static pipeline's points: four gloo ranks, memory per stage
        if rec["config"]["strategy"]["name"] == "tp2_pp2":
            assert rec["env"]["world_size"] == 4 and rec["env"]["dist_backend"] == "gloo"
            assert set(rec["memory"]) == {"stage0", "stage1"}
    assert "TPOT speed-up vs ref" in proc.stdout and "fa_pool_b2_p2" in proc.stdout
    table = proc.stdout[proc.stdout.index("matches ref"):]
    assert table.count("True") >= 6 and "False" not in table


def test_invalid_config_is_recorded_and_refused_before_launch(tmp_path):
    proc, records = run_app(["hydra.mode=RUN", "workload.output_tokens=1"], tmp_path)
    assert proc.returncode != 0
    assert [r["status"] for r in records] == ["invalid"]
    assert "output_tokens" in records[0]["error"]
    assert not records[0]["metrics"]


def test_results_dir_that_is_a_file_is_refused_with_a_record_in_hydras_directory(tmp_path):
    (tmp_path / "afile").write_text("keep")
    proc, records = run_app(["hydra.mode=RUN", f"results_dir={tmp_path / 'afile'}"], tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "FileExistsError" not in proc.stderr
    assert f"invalid: results_dir={tmp_path / 'afile'}: {tmp_path / 'afile'} is a file" in proc.stdout
    assert [r["status"] for r in records] == ["invalid"] and "results_dir" in records[0]["error"]
    assert (tmp_path / "run" / "result.json").exists() and (tmp_path / "afile").read_text() == "keep"


def test_paper_scale_presets_validate():
    from harness.config import validate
    from harness.preflight import preflight
    from tests.conftest import cfg_object

    for name, world in (("tp8_pp2", 16), ("tp16_pp2", 32), ("tp8_pp4", 32), ("fa_pool", 40), ("fa_pool_iso16", 16)):
        cfg = cfg_object([f"strategy={name}", "model=paper"])
        validate(cfg)
        preflight(cfg)
        assert cfg.strategy.world_size == world


def test_resume_does_not_take_a_projection_for_a_measurement(tmp_path):
    """An ok projected record (launcher=model) in the run directory must not satisfy resume of a measured run."""
    from tests.conftest import launch

    point = ["strategy=reference", "workload=tiny", "hardware=h100_80gb", "hardware.device=cpu", "hardware.dtype=float32"]
    projected = launch(point + ["launcher=model"], tmp_path)
    assert projected["status"] == "ok" and projected["config"]["launcher"]["kind"] == "model"
    measured = launch(point, tmp_path)
    assert measured["status"] == "ok" and measured["config"]["launcher"]["kind"] == "local"
    assert measured["run_id"] != projected["run_id"] and measured["step_times_ms"] != projected["step_times_ms"]
    again = launch(point, tmp_path)  # the same measurement again: resumed, not re-run
    assert again["created_at"] == measured["created_at"]


def test_a_multirun_with_a_bad_point_writes_everything_then_exits_non_zero(tmp_path):
    args = ["-m", "strategy=reference", "workload=tiny", "workload.batch_size=0,2"]
    proc, records = run_app(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert sorted(r["status"] for r in records) == ["invalid", "ok"]
    assert list(tmp_path.rglob("report/paper_layout.md"))  # the report was written before the exit
    # the same sweep over the same directory: the ok point resumes (fail_on_error is not part of a run's id), the
    # bad one is refused again, and the exit status is 0
    proc, again = run_app(args + ["fail_on_error=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(r["status"] for r in again) == ["invalid", "ok"]


def test_the_reference_check_reads_the_tokens_rank0_recorded(tmp_path):
    """A pipeline whose tokens travel back from the last stage: a wrong token in what rank 0 records (as a bug
    in sending tokens back would leave) fails the check although every logit matches."""
    proc, records = run_app(["hydra.mode=RUN", "strategy=tp1_pp2", "workload=tiny", "check_reference=true",
                             "fault.kind=wrong_token", "fault.rank=0", "fault.step=3"], tmp_path)
    check = records[0]["reference_check"]
    assert records[0]["status"] == "ok", records[0]["error"]
    assert check["max_abs_logit_error"] < 1e-4 and check["numerics_ok"]
    assert not check["tokens_consistent"] and not check["passed"]  # the teacher-forced pass sees it
    assert not check["tokens_equal"] and check["first_mismatch"]["step"] == 3  # and the measured generation


def test_the_reference_check_catches_a_perturbed_weight(tmp_path):
    """One base rank's embedding shard x 1.01: a real error, beyond rounding, that no token flip may hide."""
    proc, records = run_app(["hydra.mode=RUN", "strategy=fa_pool_b2_p2", "workload=tiny_mixed", "model.init_std=0.3",
                             "fault.kind=perturb_weight", "fault.rank=1"], tmp_path)
    check = records[0]["reference_check"]
    assert records[0]["status"] == "ok", records[0]["error"]
    assert not check["numerics_ok"] and not check["passed"] and check["tokens_consistent"]
    assert check["max_rel_logit_error"] > check["rtol"]
