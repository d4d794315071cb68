
import pytest
import torch

from harness.config import WorkloadConfig
from harness.measure import PHASES, PhaseTimer, breakdown, compute_metrics, percentile, timeline_summary, union_us
from harness.record import RunRecord, read_record, run_id, write_record
from harness.workload import prompt_lengths
from tests.conftest import launch


def test_metrics_on_hand_computed_timings():
    # TTFT 0.5 s; 4 decode steps of 0.1, 0.2, 0.3, 0.4 s; batch 2; 100 input tokens in all
    m = compute_metrics(0.5, [0.1, 0.2, 0.3, 0.4], input_tokens=100, batch_size=2, num_gpus=4)
    assert m["ttft_ms"] == pytest.approx(500)
    assert m["mean_tpot_ms"] == pytest.approx(250)  # (1.5 - 0.5) s / (5 - 1) tokens
    assert m["median_tpot_ms"] == pytest.approx(250)
    assert m["p90_tpot_ms"] == pytest.approx(370)  # linear interpolation between 300 and 400 at 0.7
    assert m["p99_tpot_ms"] == pytest.approx(397)
    assert m["output_tokens"] == 10  # 2 sequences x 5 tokens
    assert m["tps"] == pytest.approx((100 + 10) / 1.5)
    assert m["decode_tps"] == pytest.approx(8 / 1.0)
    assert m["tps_per_gpu"] == pytest.approx((100 + 10) / 1.5 / 4)
    assert m["e2e_ms"] == pytest.approx(1500)


def test_metrics_without_ttft_have_no_tps():
    m = compute_metrics(None, [0.1, 0.1], 10, 1, 1)
    assert m["ttft_ms"] is None and m["tps"] is None and m["mean_tpot_ms"] == pytest.approx(100)


def test_metrics_need_a_decode_step():
    with pytest.raises(ValueError, match="at least 2 output tokens"):
        compute_metrics(0.1, [], 10, 1, 1)


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 7.0, 2.0, 9.0, 4.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_breakdown_fractions_sum_to_one():
    b = breakdown({"attention": 3.0, "communication": 1.0, "synchronization": 0.5, "resource_management": 0.25,
                   "other": 0.25})
    assert sum(b.values()) == pytest.approx(1.0) and b["attention"] == pytest.approx(0.6)
    assert set(b) == set(PHASES)
    assert breakdown({})["other"] == 1.0


def test_phase_timer_counts_named_phases_and_the_rest_as_other():
    t = PhaseTimer()
    with t("attention"):
        sum(range(100000))
    rep = t.report()
    assert rep["phase_s"]["attention"] > 0 and rep["phase_s"]["other"] >= 0
    assert sum(rep["phase_s"].values()) == pytest.approx(rep["wall_s"], rel=1e-6, abs=1e-6)


def test_record_round_trips_through_json(tmp_path):
    rec = RunRecord(run_id=run_id({"a": 1}), status="ok", config={"a": 1}, metrics={"mean_tpot_ms": 1.5},
                    step_times_ms=[1.0, 2.0], elasticity=[{"step": 1}])
    path = write_record(rec, tmp_path)
    assert read_record(path) == rec
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_run_id_ignores_where_it_is_written_but_not_how_it_was_measured():
    local = {"kind": "local", "timeout_s": 60, "partition": None}
    assert run_id({"model": 1, "results_dir": "a", "resume": True, "launcher": local}) == \
        run_id({"model": 1, "results_dir": "b", "resume": False, "launcher": {**local, "timeout_s": 600}})
    assert run_id({"model": 1, "launcher": local}) != run_id({"model": 2, "launcher": local})
    assert run_id({"model": 1, "launcher": local}) != run_id({"model": 1, "launcher": {**local, "kind": "model"}})


def test_bucket_lengths_are_seeded_and_inside_their_bucket():
    w = WorkloadConfig(batch_size=8, buckets=[[512, 2048], [8192, 32768]], seed=3)
    lens = prompt_lengths(w)
    assert lens == prompt_lengths(w)
    assert all(512 <= n <= 2048 for n in lens[0::2]) and all(8192 <= n <= 32768 for n in lens[1::2])
    assert lens != prompt_lengths(WorkloadConfig(batch_size=8, buckets=[[512, 2048], [8192, 32768]], seed=4))


# A rank that raises leaves a failed record without metrics: tests/test_faults.py's raise case (tp2_pp2, rank 1,
# decode step 2) asserts the status, the error and the empty metrics and step times.


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["reference", "tp2_pp2", "fa_pool_b2_p2"])
def test_synthetic_kv_runs_have_no_ttft_and_say_so(strategy, tmp_path):
    rec = launch([f"strategy={strategy}", "workload=tiny_mixed", "workload.synthetic_kv=true"], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    assert rec["synthetic_kv"] is True and rec["metrics"]["ttft_ms"] is None
    assert rec["metrics"]["mean_tpot_ms"] > 0 and len(rec["step_times_ms"]) == 7
    for role, fractions in rec["breakdown"].items():
        assert sum(fractions.values()) == pytest.approx(1.0)


def test_a_near_tie_flip_inside_rounding_passes_and_a_real_error_fails():
    from harness.check import compare_logits

    ref = torch.zeros(3, 2, 5)
    ref[:, :, 0] = 10.0
    ref[1, 1, 3] = 9.9995  # step 1, sequence 1: a near tie between tokens 0 and 3
    rounded = ref + 1e-3 * torch.tensor([0.5, -1.0, 0.5, -0.5, 0.2])  # errors of a rounding order, below rtol
    rounded[1, 1, 0] -= 1.5e-3  # ...which flip the near tie
    rounded[1, 1, 3] += 1.5e-3
    flip = compare_logits(rounded, ref, rtol=5e-2)
    assert flip["numerics_ok"] and [(f["step"], f["sequence"]) for f in flip["argmax_flips"]] == [(1, 1)]
    assert flip["argmax_flips"][0]["ref_margin"] == pytest.approx(5e-4, abs=1e-5)
    wrong = ref.clone()
    wrong[2, 0, 4] = 12.0  # a real error: a wrong winner by 2, far outside rounding
    real = compare_logits(wrong, ref, rtol=5e-2)
    assert not real["numerics_ok"] and real["per_step"][2]["max_abs"] == pytest.approx(12.0)


def test_a_phase_timer_that_is_off_measures_and_synchronizes_nothing():
    import time

    timer = PhaseTimer("cpu", enabled=False)
    with timer("attention"):
        time.sleep(0.02)
    rep = timer.report()
    assert all(s == 0.0 for p, s in rep["phase_s"].items() if p != "other") and rep["wall_s"] >= 0.02


@pytest.mark.parametrize("strategy", ["fa_pool_b2_p2", "tp1_pp2"])
def test_the_timed_and_the_instrumented_generation_decode_the_same_tokens(strategy, tmp_path):
    rec = launch([f"strategy={strategy}", "workload=tiny_mixed"], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    assert rec["passes"]["instrumented_tokens_equal"] is True
    assert "phase timers off" in rec["passes"]["timed"] and "decode steps only" in rec["passes"]["breakdown"]
    # one untimed generation before the measured one (two only where steps are captured per plan shape: FA Pool on CUDA)
    assert rec["passes"]["warmup"].startswith(f"1 untimed generation(s) of {rec['config']['workload']['warmup_steps']}")
    assert all(r["warmup_generations"] == 1 for r in rec["ranks"])
    for fractions in rec["breakdown"].values():  # the breakdown comes from the instrumented pass
        assert sum(fractions.values()) == pytest.approx(1.0) and fractions["other"] < 1.0


def test_union_of_spans_counts_overlaps_once():
    assert union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert union_us([]) == 0


def test_timeline_splits_a_step_into_compute_nccl_alone_and_idle():
    # two steps over 0..100 us: compute 0-30 and 50-70, an NCCL kernel 25-45 (15 us of it alone), nothing 45-50
    # and 70-100 except a copy 90-100
    events = [("_split_kernel", 0, 30), ("ncclDevKernel_SendRecv", 25, 45), ("nvjet_gemm", 50, 70), ("Memcpy DtoD", 90, 100)]
    t = timeline_summary(events, steps=2)
    assert t["window_ms"] == pytest.approx(0.050)
    assert t["compute_ms"] == pytest.approx(0.030)
    assert t["nccl_only_ms"] == pytest.approx(0.0075)
    assert t["idle_ms"] == pytest.approx(0.0125)
    assert t["compute_share"] == pytest.approx(0.6)
    assert timeline_summary([], 3) == {}


def test_device_events_keep_the_work_issued_after_the_named_range_and_sum_by_kind():
    from types import SimpleNamespace as NS

    from harness.measure import device_events, kernel_summary

    ev = lambda name, start, end, dev, note=False: NS(name=name, time_range=NS(start=start, end=end),
                                                      device_type=f"DeviceType.{dev}", is_user_annotation=note)
    prof = NS(events=lambda: [ev("ncclDevKernel_AllReduce", 0, 50, "CUDA"),  # the barrier before the steps
                              ev("decode_steps", 60, 90, "CPU"), ev("decode_steps", 60, 99, "CUDA"),  # its annotation
                              ev("_split_kernel", 70, 80, "CUDA"), ev("ncclDevKernel_SendRecv", 80, 95, "CUDA"),
                              ev("nccl:send 0->1", 75, 99, "CUDA", note=True),  # torch's range around the send
                              ev("aten::mm", 65, 66, "CPU")])
    events = device_events(prof, after_range="decode_steps")
    assert events == [("_split_kernel", 70, 80), ("ncclDevKernel_SendRecv", 80, 95)]
    summary = kernel_summary(events)
    assert summary["device_s"] == {"communication": 15e-6, "attention": 10e-6, "gemm": 0.0, "other": 0.0}
    assert summary["top_kernels"][0] == {"name": "ncclDevKernel_SendRecv", "device_s": 15e-6, "calls": 1}
    assert len(device_events(prof)) == 4


def test_a_kept_trace_gives_the_same_device_events(tmp_path):
    import gzip
    import json

    from harness.measure import trace_events

    events = [{"cat": "kernel", "name": "ncclDevKernel_AllReduce", "ts": 0, "dur": 50},
              {"cat": "user_annotation", "name": "decode_steps", "ts": 60, "dur": 30},
              {"cat": "gpu_user_annotation", "name": "decode_steps", "ts": 60, "dur": 39},
              {"cat": "kernel", "name": "_split_kernel", "ts": 70, "dur": 10},
              {"cat": "gpu_user_annotation", "name": "nccl:send 0->1", "ts": 75, "dur": 24},
              {"cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 80, "dur": 15},
              {"cat": "cpu_op", "name": "aten::mm", "ts": 65, "dur": 1}]
    path = tmp_path / "rank0.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert trace_events(path, "decode_steps") == [("_split_kernel", 70, 80), ("Memcpy DtoD", 80, 95)]


@pytest.mark.parametrize("phase", ["decode_steps", "prefill"])
def test_a_profiled_generation_profiles_its_prefill_or_its_decode_steps_alone(phase):
    """runner.generate starts the profiler before the phase it profiles and stops it before the other one runs:
    profile=true sees the decode steps alone, profile_prefill=true the prefill alone."""
    from types import SimpleNamespace as NS

    from harness.runner import generate

    calls = []

    class Engine:
        has_tokens, timer = True, NS(reset=lambda: None)

        def prefill(self, prompts, max_len):
            calls.append("prefill")
            return torch.zeros(len(prompts), dtype=torch.long)

        def mark_prefill(self):
            pass

        def decode_steps(self, tok, n, forced=None, before=None, after=None):
            for i in range(n):
                calls.append("decode")
                after(i, tok)

        def finish(self):
            calls.append("finish")

    profiler = NS(start=lambda: calls.append("start"), stop=lambda: calls.append("stop"))
    tokens = generate(Engine(), [[1, 2], [3, 4]], 3, 8, False, 0, profiler=profiler, profiled=phase)
    assert tokens.shape == (2, 3)
    expected = {"prefill": ["start", "prefill", "stop", "decode", "decode", "finish"],
                "decode_steps": ["prefill", "start", "decode", "decode", "stop", "finish"]}
    assert calls == expected[phase]


def test_decode_metrics_dataclass_writes_the_records_keys():
    """DecodeMetrics.to_dict gives a committed measured record's `metrics` back, key for key."""
    import json
    from pathlib import Path

    from harness.measure import DecodeMetrics

    records = Path(__file__).resolve().parent.parent / "results" / "measured" / "h200-x4" / "bench" / "call_a" / "records"
    paths = sorted(records.glob("*/result.json"))
    assert paths
    for path in paths:
        metrics = json.loads(path.read_text())["metrics"]
        if metrics:  # a failed run has none
            assert DecodeMetrics.from_dict(metrics).to_dict() == metrics
    m = DecodeMetrics.from_times(0.5, [0.1, 0.2, 0.3, 0.4], input_tokens=100, batch_size=2, num_gpus=4)
    assert m.to_dict() == compute_metrics(0.5, [0.1, 0.2, 0.3, 0.4], 100, 2, 4)
    assert list(m.to_dict())[:3] == ["ttft_ms", "mean_tpot_ms", "median_tpot_ms"]
