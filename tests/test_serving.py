"""Trace replays end to end (gloo on CPU, the tiny model with a sharp init): every strategy that serves, each request
checked against its own single-device decode, and the replay's bookkeeping."""
import pandas as pd
import pytest

from harness.serving.run import STEPS_FILE
from tests.conftest import launch

TRACE = ["workload=tiny_mooncake", "workload.trace.first_n=12", "model.init_std=0.3", "serving.warmup_requests=1"]
STRATEGIES = ["reference", "tp2_pp2", "dcp_t2_k2", "dcp_t4_k2"]  # tp2_pp1: the preemption test; tp1_pp2: admission


def replay(tmp_path, *overrides):
    rec = launch([*TRACE, *overrides], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    return rec, pd.read_csv(tmp_path / "requests.csv"), pd.read_csv(tmp_path / STEPS_FILE)


def assert_every_request_right(rec, requests):
    check = rec["reference_check"]
    assert check["per_request"] and check["passed"], check
    assert check["requests_checked"] == len(requests) == rec["metrics"]["completed"]
    assert check["tokens_checked"] == requests.output_tokens.sum()
    assert requests.check_passed.all() and (requests.generated == requests.output_tokens).all()
    assert rec["serving"]["blocks_returned"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_request_matches_its_own_decode(strategy, tmp_path):
    rec, requests, steps = replay(tmp_path, f"strategy={strategy}")
    assert_every_request_right(rec, requests)
    # requests joined while others were decoding, and steps mixed prefill chunks with decode tokens
    assert (requests.admitted_s > requests.first_token_s.min()).any()
    assert ((steps.prefill_tokens > 0) & (steps.decode_rows > 0)).any()
    m = rec["metrics"]
    assert m["ttft_ms_p99"] >= m["ttft_ms_p50"] > 0 and m["goodput"] <= m["request_throughput"]
    assert m["steps"] == len(steps) and (steps.end >= steps.start).all()


FA_POOL = ["strategy.pool.threshold=120", "strategy.pool.tokens_per_rank=64", "serving.clock=logical"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fa_pool_b2_p2", "fa_pool_b2_p4"])
def test_fa_pool_pools_long_requests_and_migrates_the_ones_that_cross(strategy, tmp_path):
    # prompts of 106-420 tokens, threshold 120: some start in the pool, three cross it while decoding
    rec, requests, steps = replay(tmp_path, f"strategy={strategy}", "workload.trace.first_n=10", *FA_POOL)
    assert_every_request_right(rec, requests)
    assert steps.migrated.sum() == 3 and steps.pool_rows.max() >= 5
    assert ((steps.migrated > 0) & (steps.prefill_tokens > 0)).any()  # a request crosses as another one joins
    assert steps.pool_ranks_used.max() == rec["config"]["strategy"]["pool"]["size"] and steps.pool_ranks_used.iloc[-1] == 0
    pool = [r for r in rec["ranks"] if r["role"] == "pool"]
    assert len(pool) == rec["config"]["strategy"]["pool"]["size"] and all(r["comm_bytes"]["pool_to_base"] > 0 for r in pool)
    assert all(r["comm_bytes"].get("migration", 0) > 0 for r in rec["ranks"] if r["role"] == "base")


@pytest.mark.slow
def test_kv_full_preempts_and_recomputes_without_loss(tmp_path):
    # 8 requests arriving together, longer outputs: 64 blocks of 8 tokens run out while they decode (logical clock:
    # the same steps every run)
    rec, requests, steps = replay(tmp_path, "strategy=tp2_pp1", "workload.trace.first_n=8", "workload.trace.output_scale=0.125",
                                  "workload.trace.time_scale=0.001", "serving.clock=logical", "serving.block_size=8",
                                  "serving.kv_blocks=64", "serving.on_kv_full=preempt", "serving.max_batch=6")
    assert rec["metrics"]["preemptions"] > 0 and steps.preempted.sum() == rec["metrics"]["preemptions"]
    assert (requests.preemptions > 0).any()
    assert_every_request_right(rec, requests)
    assert steps.blocks_used.max() <= 64
    # steps go to the device before the previous step's tokens are read, except a recompute's, which needs them
    assert steps.launched_ahead.any() and not steps.launched_ahead.all()


@pytest.mark.slow
def test_kv_full_admission_waits(tmp_path):
    rec, requests, steps = replay(tmp_path, "strategy=tp1_pp2", "serving.kv_blocks=100", "serving.on_kv_full=reserve")
    assert rec["metrics"]["preemptions"] == 0 and steps.blocks_used.max() <= 100
    assert_every_request_right(rec, requests)


@pytest.mark.slow
def test_closed_loop(tmp_path):
    rec, requests, steps = replay(tmp_path, "strategy=reference", "workload.trace.arrival=closed",
                                  "workload.trace.concurrency=3")
    assert steps.running.max() == 3 and rec["metrics"]["completed"] == 12
    assert_every_request_right(rec, requests)


@pytest.mark.slow
def test_logical_clock_gives_the_same_tokens_every_run(tmp_path):
    # the second run reads each step's tokens before planning the next: the same steps as planning it meanwhile
    runs = [replay(tmp_path / str(i), "strategy=tp2_pp2", "serving.clock=logical", "check_reference=false",
                   f"serving.overlap_host={overlap}") for i, overlap in enumerate(("true", "false"))]
    (a, ra, sa), (b, rb, sb) = runs
    assert a["tokens_sha256"] == b["tokens_sha256"]
    # a step in which one request joins while another finishes
    assert any(ra.admitted_s.isin([start]).any() and ra.finished_s.isin([end]).any() for start, end in zip(sa.start, sa.end))
    assert list(ra.tokens_sha256) == list(rb.tokens_sha256)
    assert sa.launched_ahead.sum() > len(sa) // 2 and not sb.launched_ahead.any()  # tp2_pp2: stage 0 feeds itself
    assert sa[["prefill_tokens", "decode_rows", "running", "blocks_used"]].equals(sb[["prefill_tokens", "decode_rows", "running", "blocks_used"]])


@pytest.mark.slow
def test_a_wrong_weight_fails_the_per_request_check(tmp_path):
    rec = launch([*TRACE, "strategy=tp2_pp1", "fault.kind=perturb_weight", "fault.rank=1"], tmp_path)
    assert rec["status"] == "ok" and not rec["reference_check"]["passed"]
    assert rec["reference_check"]["n_failed"] > 0


@pytest.mark.slow
def test_a_crashed_rank_is_a_record(tmp_path):
    rec = launch([*TRACE, "strategy=tp2_pp1", "fault.kind=raise", "fault.rank=1", "fault.step=3"], tmp_path)
    assert rec["status"] == "failed" and "injected fault: rank 1" in rec["error"]


@pytest.mark.parametrize("overrides,message", [
    (["strategy=dcp_t2_k2", "strategy.kind=fa_pool"], "strategy.kind='fa_pool' but this strategy's schema is kind 'dcp'"),
    (["workload.trace.path=missing.jsonl"], "workload.trace.path='missing.jsonl': no such file"),
    (["serving.token_budget=4", "serving.max_batch=8"], "serving.token_budget=4 < serving.max_batch=8"),
    (["serving.on_kv_full=drop"], "serving.on_kv_full='drop'"),
])
def test_bad_serving_config_is_refused_before_launch(overrides, message, tmp_path):
    rec = launch([*TRACE, *overrides], tmp_path)
    assert rec["status"] == "invalid" and message in rec["error"], rec["error"]


def test_virtual_time_replay_writes_a_projected_record(tmp_path):
    rec = launch([*TRACE, "strategy=fa_pool_b2_p2", "launcher=model", "model=paper", "hardware=a100_80gb",
                  "strategy.pool.threshold=120", "strategy.pool.tokens_per_rank=64"], tmp_path)
    assert rec["status"] == "ok" and rec["env"]["source"] == "projected"
    requests, steps = pd.read_csv(tmp_path / "requests.csv"), pd.read_csv(tmp_path / STEPS_FILE)
    assert requests.completed.all() and rec["metrics"]["completed"] == 12 and rec["serving"]["blocks_returned"]
    assert (steps.device_ms > 0).all() and steps.migrated.sum() > 0  # the same scheduler: placement and migration
    # the clock is the priced steps: each step ends its price after it starts
    assert ((steps.end - steps.start) * 1e3 - steps.device_ms).abs().max() < 1e-6
    # the report draws the pool over the replay and writes its numbers binned (pool_occupancy.csv)
    from harness.collect import collect
    from harness.serving.report import plot_serving

    df, _ = collect(tmp_path)
    (tmp_path / "report").mkdir()
    files = plot_serving(df, tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "pool_occupancy.csv")
    assert tmp_path / "report" / "pool_occupancy.csv" in files
    assert table.steps.sum() == len(steps) and table.pool_ranks_used_max.max() == steps.pool_ranks_used.max()
    assert set(table.strategy) == {"fa_pool_b2_p2"} and set(table.gpus) == {4}


def test_serving_step_price_grows_with_context_and_tokens():
    import numpy as np

    from harness.calibration import default_calibration
    from harness.perfmodel import predict_serving_step, serving_config
    from tests.conftest import cfg_object

    cal = default_calibration()
    for strategy in ("tp8_pp2", "dcp_t4_k2", "fa_pool"):
        cfg = serving_config(cfg_object(["model=paper", "hardware=a100_80gb", f"strategy={strategy}"]))
        price = lambda ctx, rows=64, chunk=(): predict_serving_step(  # noqa: E731
            cfg, cal, [c[0] for c in chunk], [c[1] for c in chunk], [c[0] + c[1] > 4096 for c in chunk],
            np.full(rows, ctx), np.full(rows, ctx > 4096))
        if strategy == "fa_pool":  # eager in serving: a decode step is the host's floor until the pool's work passes it
            assert price(2000) <= price(30000) <= price(120000, rows=256) and price(2000) < price(120000, rows=256)
        else:
            assert price(2000) < price(30000) and price(2000, rows=8) < price(2000, rows=128)
        assert price(2000, chunk=[(0, 2048)]) > price(2000) and price(2000, chunk=[(60000, 2048)]) > price(2000, chunk=[(0, 2048)])


@pytest.mark.parametrize("overrides", [
    ["strategy=tp8_pp2", "workload.trace.rate=8"],
    ["strategy=dcp_t4_k2", "workload.trace.rate=4"],
    ["strategy=fa_pool", "workload.trace.rate=4", "strategy.pool.threshold=32768"],  # windows end at the threshold
    ["strategy=tp8_pp2", "workload.trace.arrival=closed", "workload.trace.concurrency=6"],
    ["strategy=tp8_pp2", "workload.trace.rate=8", "serving.kv_blocks=60"],  # admission waits on the KV
    ["strategy=tp8_pp2", "workload.trace.rate=8", "serving.kv_blocks=60", "serving.on_kv_full=preempt"],
    # a captured kind whose buckets are captured by the first pass that meets each (not at setup)
    ["strategy=reference", "hardware=h200", "workload.trace.rate=4"],
])
def test_virtual_replay_skipping_decode_steps_changes_nothing(overrides, monkeypatch):
    """The replay in virtual time runs the decode steps between events in one go (Scheduler.skip_decode); the
    same replay planned step by step leaves the same step log, token times, blocks and KV free lists."""
    import numpy as np

    from harness.serving.scheduler import Scheduler
    from harness.serving.virtual import virtual_replay
    from tests.conftest import cfg_object

    cfg = cfg_object(["experiment=paper_serving", "workload.trace.first_n=60", "serving.max_batch=16", *overrides])
    skipped = []
    skip = Scheduler.skip_decode
    monkeypatch.setattr(Scheduler, "skip_decode", lambda self, *a, **k: skipped.append(skip(self, *a, **k)) or skipped[-1])
    at_setup = cfg.strategy.kind != "reference"
    fast = virtual_replay(cfg, buckets_at_setup=at_setup).scheduler
    monkeypatch.setattr(Scheduler, "decode_window", lambda self: None)
    slow = virtual_replay(cfg, buckets_at_setup=at_setup).scheduler
    assert sum(skipped) > 0  # some steps went through skip_decode
    assert fast.log == slow.log
    assert np.array_equal(np.concatenate(fast.itl), np.concatenate(slow.itl))
    for name in ("arrival", "admitted", "first_token", "last_token", "finished"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name), equal_nan=True), name
    for name in ("generated", "preemptions", "refused", "table", "held", "promise"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    assert all(np.array_equal(a[:n], b[:n]) for a, b, n in zip(fast.kv.stacks, slow.kv.stacks, slow.kv.n_free))
    assert np.array_equal(fast.kv.n_free, slow.kv.n_free) and fast.blocks_accounted()


def test_virtual_replay_captures_each_decode_bucket_at_its_first_pass(monkeypatch):
    """A captured kind's replay in virtual time, where the buckets are not captured at setup (records of engines
    that captured each bucket at its first pass), prices the first decode pass of each bucket as such an engine ran
    it (eager, then captured) and every later one as a graph replay: one capture per bucket the replay meets. With
    the buckets captured at setup, as the engines do now, no step pays for one."""
    from harness.perfmodel import ServingPricer
    from harness.serving.virtual import virtual_replay
    from model.parallel.static import decode_buckets
    from tests.conftest import cfg_object

    cfg = cfg_object(["experiment=paper_serving", "workload.trace.first_n=60", "serving.max_batch=16",
                      "strategy=reference", "hardware=h200", "workload.trace.rate=4"])
    captures = []
    capture = ServingPricer.capture_s
    monkeypatch.setattr(ServingPricer, "capture_s", lambda self, *a: captures.append(a) or capture(self, *a))
    log = virtual_replay(cfg, buckets_at_setup=False).scheduler.log
    met = {next(b for b in decode_buckets(16) if b >= n) for n in log["decode_rows"] if n}
    assert len(met) > 1 and len(captures) == len(met)
    captures.clear()
    virtual_replay(cfg)
    assert not captures


def test_serving_metrics_dataclass_writes_the_records_keys():
    """ServingSummary.to_metrics gives a committed serving record's `metrics` back, key for key (records sort them), and
    Stats are numpy's percentiles (None without samples)."""
    import json
    from pathlib import Path

    import numpy as np

    from harness.serving.metrics import ServingSummary, Stats

    paths = sorted((Path(__file__).resolve().parent.parent / "results" / "measured" / "h200-x1" / "serve").rglob("result.json"))
    assert paths
    for path in paths:
        metrics = json.loads(path.read_text())["metrics"]
        summary = ServingSummary.from_metrics(metrics)
        assert summary.to_metrics() == metrics
        assert summary.latency["ttft_ms_p99"] == summary.latency.ttft_ms.p99 == metrics["ttft_ms_p99"]
    values = [5.0, 1.0, np.nan, 3.0, 10.0]
    s = Stats.of(values)
    finite = [5.0, 1.0, 3.0, 10.0]
    assert (s.mean, s.p50, s.p90, s.p99) == pytest.approx((np.mean(finite), *np.percentile(finite, (50, 90, 99))))
    assert Stats.of([]).flat("itl_ms") == {"itl_ms_mean": None, "itl_ms_p50": None, "itl_ms_p90": None, "itl_ms_p99": None}


def test_virtual_replay_cost_bench_counts_the_window_it_replays(capsys):
    from harness.bench_virtual import main, replay_cost

    sample = "results/reference/traces/mooncake_conversation_sample.jsonl"
    cost = replay_cost(["experiment=paper_serving", "strategy=tp8_pp2", "workload.trace.first_n=30",
                        "workload.trace.rate=8"])
    assert cost["requests"] == 30 and cost["steps"] > 0 and cost["CPU s"] > 0
    main(["--trace", sample, "--windows", "20,40"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")][2:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert [(row[0], row[1]) for row in rows] == [("20", "20"), ("40", "40")]  # window, requests replayed
    with pytest.raises(SystemExit, match="no such file"):
        main(["--trace", "no/such/trace.jsonl"])


def test_pool_occupancy_bins_a_step_log_by_replay_time():
    import pandas as pd

    from harness.serving.report import pool_occupancy

    steps = pd.DataFrame({"end": [0.5, 30.0, 59.9, 60.0, 150.0], "pool_ranks_used": [0, 2, 4, 1, 3],
                          "pool_rows": [0, 1, 3, 1, 2], "pool_blocks_used": [0, 10, 40, 12, 20],
                          "migrated": [0, 1, 1, 0, 2]})
    t = pool_occupancy(steps, bin_s=60)
    assert t.bin_start_s.tolist() == [0.0, 60.0, 120.0]  # empty bins are left out
    assert t.steps.tolist() == [3, 1, 1] and t.pool_ranks_used_max.tolist() == [4, 1, 3]
    assert t.pool_ranks_used_mean.tolist() == [2.0, 1.0, 3.0] and t.pool_rows_max.tolist() == [3, 1, 2]
    assert t.pool_blocks_used_max.tolist() == [40, 12, 20] and t.migrated.tolist() == [2, 0, 2]


def test_a_prefill_pass_padded_to_its_token_count_bucket_gives_the_same_tokens_logits_and_kv(tmp_path):
    """A small prefill pass replays, on GPUs, a graph of its token-count bucket: rows, chunk width and keys spanned
    padded (model/parallel/static.PrefillIO), through one mask. The padded pass, run here eagerly, gives each row the
    tokens and logits of the pass as it comes, and writes the same KV: a first chunk, then a second chunk after
    cached keys with rows of different starts, then one row (which the pass as it comes attends row by row)."""
    import tempfile

    import torch
    import torch.distributed as dist

    from harness.bench_serving import config
    from harness.measure import PhaseTimer
    from harness.runner import build_engine
    from model.parallel.serving_kv import ServingPass
    from model.parallel.static import PrefillIO, prefill_bucket

    cfg, _ = config(["workload=tiny_mooncake", "model.init_std=0.3", "hardware.dtype=float32",
                     "check_reference=false"])
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp(dir=tmp_path)}", rank=0, world_size=1)
    try:
        engine = build_engine(cfg, 0, 1, torch.device("cpu"), PhaseTimer("cpu", enabled=False))
        engine.serve_setup(slots=6, kv_blocks=40, block_size=8, max_blocks=8)
        engine.keep_logits = True
        gen = torch.Generator().manual_seed(0)
        # slots 0, 1, 2 hold blocks 0-7, 8-15, 16-23 (8 blocks of 8 tokens each)
        updates = torch.tensor([[s, j, 8 * s + j] for s in range(3) for j in range(8)])
        long = lambda *x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        for starts, lens in (((0, 0, 0), (5, 3, 7)), ((5, 3, 7), (6, 9, 2)), ((11,), (4,))):
            n, width, upto = len(lens), max(lens), max(a + q for a, q in zip(starts, lens))
            p = ServingPass(long(*range(n)), long(*starts), long(*lens), True, width, upto, host_start=starts,
                            host_lens=lens)
            ids = torch.randint(0, cfg.model.vocab_size, (n, width), generator=gen)
            kv_before = engine.serving.store.kv.clone()
            eager = engine.serve_step([(p, ids)], updates)
            eager_logits, kv_eager = engine.logits.pop(), engine.serving.store.kv.clone()
            engine.serving.store.kv.copy_(kv_before)
            bucket = prefill_bucket(n, width, upto)
            assert bucket[0] >= n and bucket[1] >= 16 and bucket[2] >= 64  # width and keys padded
            io = PrefillIO(bucket, cfg.model.vocab_size, torch.device("cpu"))
            io.load(p, ids, engine.pad_slot)
            engine._prefill_body(io)
            assert torch.equal(io.tokens_out[:n], eager)
            torch.testing.assert_close(io.logits[:n], eager_logits, rtol=1e-5, atol=1e-5)
            sink = engine.serving.sink  # padding writes only to the sink block
            real = [i for i in range(kv_eager.shape[2]) if i != sink]
            torch.testing.assert_close(engine.serving.store.kv[:, :, real], kv_eager[:, :, real], rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_a_pool_rank_attends_over_its_own_blocks_of_a_row_gathered_not_the_rows_span():
    # a pool rank holding blocks 10..15 (local 0..5): row 0 holds logical blocks 0, 2, 4 here (22 tokens, its last
    # block elsewhere); row 1 blocks 1, 2 (11 tokens, the last one partly filled) and stale entries past its end
    import math

    import torch

    from model.parallel.fa_pool_serving import FAPoolServingPool
    from model.parallel.serving_kv import ServingKV, ServingPass

    torch.manual_seed(0)
    bs, heads, dim = 4, 2, 8
    kv = ServingKV(1, 2, 6, heads, bs, dim, 8, torch.float32, "cpu", first_id=10)
    kv.table[0, :6] = torch.tensor([10, 3, 11, 4, 12, 5], dtype=torch.int32)
    kv.table[1, :5] = torch.tensor([2, 13, 14, 15, 15], dtype=torch.int32)
    kv.store.kv.normal_()
    ends = [22, 11]
    gathered = []
    dense = kv.store.dense
    kv.store.dense = lambda layer, slots, upto: gathered.append(upto) or dense(layer, slots, upto)
    rank = FAPoolServingPool.__new__(FAPoolServingPool)  # _partial needs only the store and the backend
    rank.serving, rank.backend = kv, "math"

    def expected(q, row, positions):  # math over the row's keys held here, each query at its position
        own = kv.local_table(torch.tensor([row]))[0].long()
        keys, values = [], []
        for pos in range(ends[row]):
            j = pos // bs
            if own[j] != kv.sink:
                keys.append((pos, kv.store.kv[0, 0, own[j], :, pos % bs], kv.store.kv[0, 1, own[j], :, pos % bs]))
        outs, lses = [], []
        for t, qpos in enumerate(positions):
            seen = [(k, v) for p, k, v in keys if p <= qpos]
            k, v = torch.stack([k for k, _ in seen], 1), torch.stack([v for _, v in seen], 1)  # [H, n, D]
            scores = torch.einsum("hd,hnd->hn", q[:, t], k) / math.sqrt(dim)
            outs.append(torch.einsum("hn,hnd->hd", scores.softmax(-1), v))
            lses.append(scores.logsumexp(-1))
        return torch.stack(outs, 1), torch.stack(lses, 1)

    long = lambda *x: torch.tensor(x)  # noqa: E731
    q = torch.randn(2, heads, 1, dim)
    decode = ServingPass(long(0, 1), long(21, 10), long(1, 1), False, 1, 22)
    out, lse = rank._partial(0, q, decode, 3)
    for row in (0, 1):
        want_out, want_lse = expected(q[row], row, [ends[row] - 1])
        torch.testing.assert_close(out[row], want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[row], want_lse, atol=1e-5, rtol=1e-5)
    q = torch.randn(2, heads, 6, dim)
    chunk = ServingPass(long(0, 1), long(16, 8), long(6, 3), True, 6, 22)
    out, lse = rank._partial(0, q, chunk, 3)
    for row, (start, n) in enumerate([(16, 6), (8, 3)]):
        want_out, want_lse = expected(q[row], row, range(start, start + n))
        torch.testing.assert_close(out[row, :, :n], want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[row, :, :n], want_lse, atol=1e-5, rtol=1e-5)
    assert gathered == [3 * bs]  # the prefill chunk gathered 3 blocks a row, not the 6 the rows span


def test_a_pool_rank_gathers_its_blocks_and_builds_its_work_list_once_a_pass(monkeypatch):
    """A pool rank's gathered table and a decode pass's work list are the same in every layer: with the pass
    current (ServingKV.current, set once a pass), every layer after the first reuses them, and each layer's
    partials equal those computed for that layer alone."""
    import torch

    from model.parallel import fa_pool_serving
    from model.parallel.fa_pool_serving import FAPoolServingPool
    from model.parallel.serving_kv import ServingKV, ServingPass

    calls = {"plan": 0, "table": 0}
    pass_plan, local_table = fa_pool_serving.pass_plan, ServingKV.local_table
    monkeypatch.setattr(fa_pool_serving, "pass_plan", lambda *a: calls.update(plan=calls["plan"] + 1) or pass_plan(*a))
    monkeypatch.setattr(ServingKV, "local_table",
                        lambda self, slots: calls.update(table=calls["table"] + 1) or local_table(self, slots))
    torch.manual_seed(0)
    layers, bs, heads, dim = 3, 4, 2, 8
    kv = ServingKV(layers, 2, 6, heads, bs, dim, 8, torch.float32, "cpu", first_id=10)
    kv.table[0, :6] = torch.tensor([10, 3, 11, 4, 12, 5], dtype=torch.int32)
    kv.table[1, :3] = torch.tensor([2, 13, 14], dtype=torch.int32)
    kv.store.kv.normal_()
    rank = FAPoolServingPool.__new__(FAPoolServingPool)
    rank.serving, rank.backend = kv, "math"
    long = lambda *x: torch.tensor(x)  # noqa: E731
    q = torch.randn(2, heads, 1, dim)
    alone = [rank._partial(layer, q, ServingPass(long(0, 1), long(21, 10), long(1, 1), False, 1, 22), 3)
             for layer in range(layers)]  # a pass that is not current: computed for the layer itself
    assert calls == {"plan": layers, "table": layers}
    calls.update(plan=0, table=0)
    decode = ServingPass(long(0, 1), long(21, 10), long(1, 1), False, 1, 22)
    kv.current = decode
    for layer in range(layers):
        out, lse = rank._partial(layer, q, decode, 3)
        torch.testing.assert_close(out, alone[layer][0], atol=0, rtol=0)
        torch.testing.assert_close(lse, alone[layer][1], atol=0, rtol=0)
    assert calls == {"plan": 1, "table": 1}
    assert not torch.equal(alone[0][0], alone[1][0])  # the layers' keys differ: a shared output would show


def test_a_decode_pass_builds_its_table_and_work_list_once_for_all_its_layers(tmp_path, monkeypatch):
    """The rows' local table and the paged kernel's work list depend on the pass, not the layer: each pass computes
    them once (model/parallel/serving_kv.ServingKV.of_pass), whatever its layers; a new pass computes its own."""
    import tempfile

    import torch
    import torch.distributed as dist

    from harness.bench_serving import config
    from harness.measure import PhaseTimer
    from harness.runner import build_engine
    from model.parallel import serving_kv
    from model.parallel.serving_kv import ServingKV, ServingPass

    calls = {"plan": 0, "table": 0}
    pass_plan, local_table = serving_kv.pass_plan, ServingKV.local_table

    def counted_plan(*args):
        calls["plan"] += 1
        return pass_plan(*args)

    def counted_table(self, slots):
        calls["table"] += 1
        return local_table(self, slots)

    monkeypatch.setattr(serving_kv, "pass_plan", counted_plan)
    monkeypatch.setattr(ServingKV, "local_table", counted_table)
    cfg, _ = config(["workload=tiny_mooncake", "model.n_layers=3", "hardware.dtype=float32", "check_reference=false"])
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp(dir=tmp_path)}", rank=0, world_size=1)
    try:
        engine = build_engine(cfg, 0, 1, torch.device("cpu"), PhaseTimer("cpu", enabled=False))
        engine.serve_setup(slots=4, kv_blocks=16, block_size=8, max_blocks=4)
        updates = torch.tensor([[s, 0, s] for s in range(3)])
        long = lambda *x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        for step in range(3):
            p = ServingPass(long(0, 1, 2), long(5 + step, 3 + step, 7 + step), long(1, 1, 1), False, 1, 8 + step)
            engine.serve_step([(p, torch.zeros(3, 1, dtype=torch.long))], updates)
            assert calls == {"plan": step + 1, "table": step + 1}, (step, calls)  # 3 layers, one of each per pass
    finally:
        dist.destroy_process_group()
