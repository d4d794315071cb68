"""The roofline of a record (harness/roofline.py) on hand-computed cases."""
import pytest

from harness.roofline import op_time, roofline
from tests.conftest import cfg_object

COMM = {"all_reduce": {"2": [[1000, 1e-5], [4000, 4e-5]]}, "all_gather": {"2": [[1000, 2e-5], [4000, 2e-5]]},
        "p2p": {"2": [[1000, 3e-5], [4000, 6e-5]]}}


def test_op_time_interpolates_in_log_log_and_extrapolates_by_bandwidth():
    assert op_time(COMM, "all_reduce", 2, 2000) == pytest.approx(2e-5)  # halfway in log size: halfway in log time
    assert op_time(COMM, "all_reduce", 2, 10) == pytest.approx(1e-5)  # latency-bound below the table
    assert op_time(COMM, "all_reduce", 2, 8000) == pytest.approx(8e-5)  # the largest size's bandwidth above it
    assert op_time(COMM, "all_reduce", 4, 1000) == pytest.approx(1e-5)  # an uncalibrated group: the largest one's


def test_roofline_of_a_tp2_record_by_hand():
    cfg = cfg_object(["strategy=tp2_pp1", "workload=tiny", "workload.batch_size=2", "workload.prompt_lens=[10]",
                      "workload.output_tokens=5", "hardware.dtype=float32"])
    m = cfg.model
    embed = m.vocab_size * m.hidden * 4 // 2
    ranks = [{"rank": r, "role": "stage0", "weight_bytes": 10**6 + embed,
              "comm_ops": {"tp_allreduce": 8, "tp_allgather": 4}, "comm_bytes": {"tp_allreduce": 8 * 2000, "tp_allgather": 4 * 1000}}
             for r in range(2)]
    rec = {"ranks": ranks, "metrics": {"mean_tpot_ms": 1.0}}
    roof = roofline(cfg, rec, read_bytes_per_s=1e9, comm=COMM)
    # KV: 2 sequences x (10 + 5/2) tokens x layers / 2 ranks, each token-layer 2 x hidden x 4 bytes
    kv = 2 * 12.5 * m.n_layers / 2 * (2 * m.hidden * 4)
    # per step (4 steps): 2 all-reduces of 2000 B (2e-5 s each), 1 all-gather of 1000 B per rank (2e-5 s)
    comm = 2 * 2e-5 + 1 * 2e-5
    step = (10**6 + kv) / 1e9 + comm
    assert roof["per_rank"][0]["kv_bytes"] == pytest.approx(kv)
    assert roof["per_rank"][0]["weight_bytes"] == 10**6  # the embedding table is not read whole
    assert roof["step_ms"] == pytest.approx(step * 1e3)
    assert roof["ratio"] == pytest.approx(1e-3 / step)


def test_roofline_counts_dcp_traffic_per_peer_in_its_kv_shard_group():
    cfg = cfg_object(["strategy=dcp_t4_k2", "workload=tiny", "workload.batch_size=2", "workload.prompt_lens=[10]",
                      "workload.output_tokens=5", "hardware.dtype=float32"])
    comm = {**COMM, "all_to_all": {"2": [[1000, 5e-5], [4000, 5e-5]]}}
    m = cfg.model
    # per step (4 steps): 1 all-gather that brought 1000 B from the one peer of the pair, 1 all-to-all that sent
    # 1000 B to it; with tp = 4 the group is still the KV-shard pair (the 2-rank rows of the tables)
    rank = {"rank": 0, "role": "stage0", "weight_bytes": m.vocab_size * m.hidden * 4 // 4,
            "comm_ops": {"dcp_allgather": 4, "dcp_alltoall": 4}, "comm_bytes": {"dcp_allgather": 4000, "dcp_alltoall": 4000}}
    roof = roofline(cfg, {"ranks": [rank], "metrics": {"mean_tpot_ms": 1.0}}, read_bytes_per_s=1e30, comm=comm)
    assert roof["step_ms"] == pytest.approx((2e-5 + 5e-5) * 1e3)
    # a calibration without all-to-all times it as an all-gather of the same bytes per peer
    assert op_time(COMM, "all_to_all", 2, 1000) == op_time(COMM, "all_gather", 2, 1000)


def test_roofline_of_an_fa_pool_record_puts_the_kv_on_the_pool():
    cfg = cfg_object(["strategy=fa_pool_b2_p2", "workload=tiny", "workload.batch_size=4", "workload.prompt_lens=[10,100]",
                      "workload.output_tokens=3", "hardware.dtype=float32"])  # threshold 32: the 100-token rows pool
    base = {"role": "base", "weight_bytes": cfg.model.vocab_size * cfg.model.hidden * 4 // 2}  # its embedding slice
    pool = {"role": "pool", "weight_bytes": 0}
    rec = {"ranks": [dict(base, rank=0), dict(base, rank=1), dict(pool, rank=2), dict(pool, rank=3)],
           "metrics": {"mean_tpot_ms": 1.0}}
    roof = roofline(cfg, rec, read_bytes_per_s=1.0, comm=COMM)
    token_layer = 2 * cfg.model.hidden * 4
    short, long = 2 * (10 + 1.5), 2 * (100 + 1.5)
    layers = cfg.model.n_layers
    assert roof["per_rank"][0]["kv_bytes"] == pytest.approx(short * layers / 2 * token_layer)  # heads over 2 base ranks
    assert roof["per_rank"][2]["kv_bytes"] == pytest.approx(long * layers / 2 * token_layer)  # tokens over 2 pool ranks
    assert roof["bound_rank"] == 2


# the smoke call's synthetic-KV dcp_t2_k2 record is also the real-prefill test's comparison: one worker runs both
SMOKE = pytest.mark.xdist_group("bench_multi_smoke")


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    """The multi-GPU benchmark's smoke call on 2 CPU ranks (its runs started as the benchmark starts them)."""
    from harness import bench_multi

    out = tmp_path_factory.mktemp("bench_multi_smoke")
    bench_multi.main(["--smoke", "--out", str(out), "--points", "48x4:reference+tp2+dcp_t2_k2"])
    return out


@SMOKE
def test_multi_gpu_benchmark_smoke(smoke_out):
    """The multi-GPU benchmark's whole path on 2 CPU ranks: NCCL-style calibration (gloo, eager), runs through
    fapool-bench, a roofline in every ok record, the table."""
    import json

    tmp_path = smoke_out
    limits = json.loads((tmp_path / "limits.json").read_text())
    assert set(limits["comm"]["eager"]) == {"all_reduce", "all_gather", "all_to_all", "p2p"} and limits["read_bytes_per_s"]["used"] > 0
    rows = json.loads((tmp_path / "bench_multi.json").read_text())["rows"]
    assert [(r["run"], r["status"]) for r in rows] == [("reference", "ok"), ("tp2", "ok"), ("dcp_t2_k2", "ok")]
    for r in rows:
        rec = json.loads((tmp_path / "records" / f"{r['run']}_L48_B4" / "result.json").read_text())
        roof = rec["roofline"]
        assert roof["step_ms"] > 0 and roof["ratio"] == pytest.approx(rec["metrics"]["mean_tpot_ms"] / roof["step_ms"])
        assert len(roof["per_rank"]) == rec["metrics"]["num_gpus"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in (tmp_path / "bench_multi.md").read_text().splitlines()
             if line.startswith("|")]
    assert ["reference", "48", "4", "1", "ok"] in [c[:5] for c in cells]
    assert [r["kind"] for r in rows] == ["reference", "static", "dcp"]  # each run's family: its strategy's kind


@SMOKE
def test_multi_gpu_benchmark_with_a_real_prefill(tmp_path, monkeypatch, smoke_out):
    """--prefill-chunk: the same runs with a real, chunked prefill instead of synthetic KV: TTFT and the paper's
    TPS in the table. Each run's fapool-bench command is called in this process (the smoke test above starts
    them as the benchmark does)."""
    import json
    import subprocess
    import sys
    from types import SimpleNamespace

    from harness import bench_multi
    from tests.conftest import call_app

    def app_here(cmd, stdout, stderr, timeout, check):
        assert cmd[:3] == [sys.executable, "-m", "harness.app"], cmd
        proc = call_app(cmd[3:])
        stdout.write(proc.stdout + proc.stderr)
        return proc

    monkeypatch.setattr(bench_multi, "subprocess", SimpleNamespace(run=app_here, STDOUT=subprocess.STDOUT))

    bench_multi.main(["--smoke", "--out", str(tmp_path), "--points", "48x4:reference+dcp_t2_k2", "--prefill-chunk", "16"])
    rows = json.loads((tmp_path / "bench_multi.json").read_text())["rows"]
    assert [(r["run"], r["status"], r["tag"]) for r in rows] == [("reference", "ok", "reference_L48_B4_prefill"),
                                                                  ("dcp_t2_k2", "ok", "dcp_t2_k2_L48_B4_prefill")]
    for r in rows:
        assert r["ttft_ms"] > 0 and r["tps_per_gpu"] > 0
        rec = json.loads((tmp_path / "records" / r["tag"] / "result.json").read_text())
        assert rec["config"]["workload"]["synthetic_kv"] is False and rec["config"]["strategy"]["prefill_chunk"] == 16
        assert rec["config"]["profile"] is False  # the kernel profile is the decode runs'
    assert "ttft_ms" in (tmp_path / "bench_multi.md").read_text()
    (tmp_path / "bench_multi.md").unlink()  # a call cut off before its tables: --rebuild writes them from the records
    bench_multi.main(["--out", str(tmp_path), "--rebuild"])
    again = json.loads((tmp_path / "bench_multi.json").read_text())["rows"]
    assert [(r["run"], r["tag"], r["ttft_ms"], r["ratio"]) for r in again] == [(r["run"], r["tag"], r["ttft_ms"], r["ratio"]) for r in rows]
    assert "ttft_ms" in (tmp_path / "bench_multi.md").read_text()
    # the decode roofline leaves the prefill's messages out: the same as the synthetic-KV run's of the point (the
    # smoke call's, the same point without --prefill-chunk)
    from harness.config import from_dict

    real, synthetic = (json.loads((d / "records" / tag / "result.json").read_text()) for d, tag in
                       ((tmp_path, "dcp_t2_k2_L48_B4_prefill"), (smoke_out, "dcp_t2_k2_L48_B4")))
    assert all(r["comm_ops_prefill"]["dcp_alltoall"] > 0 for r in real["ranks"])
    assert real["ranks"][0]["comm_ops"]["dcp_alltoall"] > synthetic["ranks"][0]["comm_ops"]["dcp_alltoall"]
    step = [roofline(from_dict(r["config"]), r, 1e9, COMM)["step_ms"] for r in (real, synthetic)]
    assert step[0] == pytest.approx(step[1])
    del real["ranks"][0]["comm_ops_prefill"]  # a record from before the counts were held apart: no roofline
    assert roofline(from_dict(real["config"]), real, 1e9, COMM)["ratio"] is None
