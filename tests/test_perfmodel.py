"""The performance model's memory per role, pinned on a hand-computed case (what the engines allocate)."""
from harness.preflight import memory_by_role
from tests.conftest import ROOT, cfg_object


def test_fa_pool_memory_is_what_the_engine_allocates():
    # paper model, bf16, base TP8 + pool 32, threshold 4096, blocks of 256; two sequences start short, two long
    cfg = cfg_object(["model=paper", "strategy=fa_pool", "hardware=a100_80gb", "launcher=model",
                      "workload.prompt_lens=[1000,16000]", "workload.batch_size=4", "workload.output_tokens=16"])
    roles = {r.role: r for r in memory_by_role(cfg)}
    kv_token = 2 * 4096 * 2  # k and v, all heads, one layer, bf16
    # base: a row of ceil(min(16016, 4096) / 256) = 16 blocks for each of the 2 short starters, + 1 trash block
    assert roles["base"].kv_bytes == (2 * 16 * 256 + 256) * kv_token * 4 // 8
    # pool: 2 x ceil(16016 / 256) = 126 blocks over 32 ranks -> 4 blocks on the fullest rank
    assert roles["pool"].kv_bytes == 4 * 256 * kv_token * 4
    assert roles["pool"].weight_bytes == 0 and roles["pool"].ranks == 32 and roles["base"].ranks == 8


# -- time: the decode step on hand-computed cases -------------------------------------------------------------
import dataclasses  # noqa: E402

import pytest  # noqa: E402

from harness.calibration import Calibration  # noqa: E402
from harness.perfmodel import predict_step  # noqa: E402

TABLE = {op: {"2": [[1, t], [1 << 40, t]]} for op, t in (("all_reduce", 1e-5), ("all_gather", 2e-5), ("p2p", 5e-5))}
FLAT = {"graph": TABLE, "eager": TABLE}  # every size takes the same time: a constant per operation


def simple_cal(**kw) -> Calibration:
    """Bytes at 1e12 B/s with no floors, 1e-4 s fixed per layer, NCCL at the constants of TABLE, no host floor."""
    base = dict(read_bw=1e12, attn_bw_fraction=1.0, attn_fixed_s=0.0, gemm_bw_fraction=1.0, gemm_fixed_s=0.0,
                layer_fixed_s=1e-4, gemm_flops_fraction=1.0, merge_s=0.0, message_s=0.0, plan_s=0.0, comm=FLAT)
    return dataclasses.replace(Calibration(), **{**base, **kw})


def small(strategy, *extra):
    return cfg_object([strategy, "model=tiny", "model.n_layers=2", "hardware=h100_80gb", "hardware.dtype=float32",
                       "workload.batch_size=4", "workload.prompt_lens=[100]", "workload.output_tokens=4", *extra])


def test_static_tp2_step_by_hand():
    cfg = small("strategy=tp2_pp1")  # tiny: hidden 64, FFN 256, vocab 512; fp32; 4 rows, contexts 100 + 4 / 2
    gemm = lambda k, n: (k * n + 4 * (k + n)) * 4 / 1e12  # noqa: E731  weights + activations read once
    gemms = gemm(64, 96) + gemm(32, 64) + gemm(64, 128) + gemm(128, 64)  # QKV, out, up, down of a TP2 shard
    attn = 4 * 102 * 2 * 64 * 4 / 2 / 1e12  # the rank's KV: 4 x 102 tokens, K and V, half the heads
    layer = gemms + attn + 1e-4 + 2 * 1e-5  # + the per-layer floor + 2 all-reduces
    step = 2 * layer + 1e-5 + gemm(64, 256) + 2e-5  # + the embedding's all-reduce, the LM head and its all-gather
    assert predict_step(cfg, simple_cal())["step_s"] == pytest.approx(step, rel=1e-9)


def test_dcp_step_by_hand():
    """DCP = TP + per layer one all-gather of q, k, v and one all-to-all of partials in the KV-shard group, and the
    LSE merge; its attention reads what TP's does."""
    table = {**TABLE, "all_to_all": {"2": [[1, 3e-5], [1 << 40, 3e-5]]}}
    cal = simple_cal(merge_s=7e-6, comm={"graph": table, "eager": table})
    tp = predict_step(small("strategy=tp2_pp1"), cal)["step_s"]
    dcp = predict_step(small("strategy=dcp_t2_k2"), cal)["step_s"]
    assert dcp - tp == pytest.approx(2 * (2e-5 + 3e-5 + 7e-6), rel=1e-9)  # 2 layers


def test_pipeline_schedules_by_hand():
    # bandwidth so high that a stage pass is its layer floor (1e-4 s, one layer per stage; the GEMMs' FLOPs add
    # 1e-9); a message 5e-5 s
    cal = simple_cal(read_bw=1e30, comm={"graph": TABLE, "eager": TABLE})
    cont = predict_step(small("strategy=tp1_pp2", "strategy.micro_batches=2"), cal)["step_s"]
    gpipe = predict_step(small("strategy=tp1_pp2", "strategy.micro_batches=2", "strategy.schedule=gpipe"), cal)["step_s"]
    round_trip = 2 * 1e-4 + 2 * 5e-5  # both stages and both messages (forward, tokens back) of one micro-batch
    assert cont == pytest.approx(max(2 * 1e-4, round_trip), rel=1e-5)  # continuous: the round trip bounds the step
    assert gpipe == pytest.approx(round_trip + 1e-4, rel=1e-5)  # gpipe: + the second micro-batch behind the first


@pytest.mark.parametrize("hierarchical,per_unit", [(False, 2), (True, 3)])
def test_fa_pool_messages_per_layer_and_micro_batch(hierarchical, per_unit):
    # every long row pooled; one micro-batch: a unit per layer sends q to the pool and gets partials back, plus a
    # member -> leader hop when hierarchical; each message costs message_s on the critical path
    over = ["strategy=fa_pool_b2_p2", "workload.prompt_lens=[100]", "strategy.micro_batches=1",
            f"strategy.pool.hierarchical={str(hierarchical).lower()}", "strategy.cuda_graphs=true", "strategy.tp=1",
            "strategy.pool.size=2", "strategy.pool.max_size=2", "strategy.world_size=3"]
    cfg = small(*over)
    d = predict_step(cfg, simple_cal(message_s=1e-3))["step_s"] - predict_step(cfg, simple_cal())["step_s"]
    assert d == pytest.approx(cfg.model.n_layers * per_unit * 1e-3, rel=1e-9)


def test_paper_scale_fit():
    """At batch 1024 and 32K (A100 80 GB) TP8/PP2 cannot hold its KV; FA Pool 8+32 can (README)."""
    from harness.preflight import check_fits

    paper = ["model=paper", "hardware=a100_80gb", "launcher=model", "workload=len32768"]
    assert "does not fit" in check_fits(cfg_object(["strategy=tp8_pp2", *paper]))
    assert check_fits(cfg_object(["strategy=fa_pool", *paper])) is None


def test_fa_pool_step_is_never_shorter_than_its_host_time():
    cfg = small("strategy=fa_pool_b2_p2")  # 2 layers, 2 micro-batches: 4 units; a base of 2 ranks
    assert predict_step(cfg, simple_cal(plan_s=1.0), graphed=True)["step_s"] == pytest.approx(1.0)
    eager = predict_step(cfg, simple_cal(plan_s=1.0, eager_unit_s={1: 9.0, 2: 0.5}), graphed=False)["step_s"]
    assert eager == pytest.approx(1.0 + 4 * 0.5)  # the plan, then every unit's kernels and messages


def test_static_memory_is_what_the_engine_allocates():
    # TP2 x PP2, fp32, tiny (hidden 64, 2 layers): 4 sequences of 100 and 300 tokens + 4 output tokens; every
    # sequence gets room for the longest (304) in blocks of 256 tokens: 512 tokens
    cfg = small("strategy=tp2_pp2", "workload.prompt_lens=[100,300]")
    kv_token = 2 * 64 * 4  # k and v, all heads, one layer, fp32
    roles = {r.role: r for r in memory_by_role(cfg)}
    assert set(roles) == {"stage0", "stage1"} and roles["stage0"].ranks == 2
    assert roles["stage0"].kv_bytes == 4 * 512 * kv_token * 1 // 2  # one layer per stage, half the heads


def test_a_step_of_small_gemms_is_bound_by_flops_when_bandwidth_is_not():
    # bandwidth unlimited, no floors, no collectives: the step is the GEMMs' FLOPs at the H100 preset's peak
    cfg = small("strategy=reference", "hardware.peak_tflops=1e-3")  # 1 GFLOP/s, so FLOPs dominate everything
    cal = simple_cal(read_bw=1e30, layer_fixed_s=0.0)
    h, f, v = 64, 256, 512
    flops = 2 * 4 * (2 * (h * 3 * h + h * h + 2 * h * f) + h * v)  # 4 rows: 2 layers of QKV, out, up, down + head
    assert predict_step(cfg, cal)["step_s"] == pytest.approx(flops / 1e9, rel=1e-6)


def test_fa_pool_wavefront_pays_a_micro_batch_chain_per_layer_not_the_layer_barrier():
    # two micro-batches, every row pooled, graphed: with message_s dominating, a unit's chain is base + 2 messages
    # + pool; the layer-wise overlap pays M busier units plus one chain's messages and the lesser unit per layer,
    # the wavefront only the longest of M busier units and one micro-batch's chain
    over = ["strategy=fa_pool_b2_p2", "workload.prompt_lens=[100]", "strategy.micro_batches=2", "strategy.tp=1",
            "strategy.pool.hierarchical=false", "strategy.cuda_graphs=true", "strategy.pool.size=2",
            "strategy.pool.max_size=2", "strategy.world_size=3"]
    cal = simple_cal(message_s=1e-3)
    layered = predict_step(small(*over), cal)["step_s"]
    wave = predict_step(small(*over, "strategy.pool.wavefront=true"), cal)["step_s"]
    slower = predict_step(small(*over, "strategy.pool.wavefront=true"), simple_cal(message_s=2e-3))["step_s"]
    assert wave < layered
    # messages dominate: the chain (two messages) sets each layer, so 1 ms more per message costs 2 ms per layer
    assert slower - wave == pytest.approx(small(*over).model.n_layers * 2e-3, rel=1e-6)


# -- prefill: chunk by chunk, on hand-computed cases ------------------------------------------------------------
def _prefill_by_hand(tp=1, chunk=0):
    """tiny (hidden 64, FFN 256, vocab 512), 2 layers, 4 prompts of 100: FLOPs at 1 TFLOP/s."""
    flops = 1e12
    dense = 2 * (4 * 64 * 64 + 2 * 64 * 256)  # one layer's GEMM FLOPs per token
    starts = range(0, 100, chunk or 100)
    total = 0.0
    for start in starts:
        q = min(chunk or 100, 100 - start)
        per_layer = (4 * q * dense + 4 * 4 * 64 * q * start + 4 * 4 * 64 * q * (q + 1) / 2) / flops / tp
        total += 2 * (per_layer + 2 * (1e-5 if tp > 1 else 0.0))  # 2 layers, 2 all-reduces each
    return total + 2 * 4 * 64 * 512 / flops / tp  # the LM head on each prompt's last position


@pytest.mark.parametrize("strategy,tp,chunk", [("strategy=reference", 1, 0), ("strategy=tp2_pp1", 2, 0),
                                               ("strategy=tp2_pp1", 2, 32)])
def test_static_prefill_by_hand(strategy, tp, chunk):
    """Per chunk and layer: GEMM FLOPs of its tokens, attention over the keys before it and causal over itself,
    all split over TP, and 2 all-reduces (eager: prefill is not captured)."""
    cfg = small(strategy, f"strategy.prefill_chunk={chunk}", "strategy.kv_block=16", "hardware.peak_tflops=1")
    cal = simple_cal(prefill_flops_fraction=1.0)
    assert predict_step(cfg, cal)["prefill_s"] == pytest.approx(_prefill_by_hand(tp, chunk), rel=1e-9)


@pytest.mark.parametrize("wavefront", [False, True])
def test_fa_pool_pool_rank_is_busy_for_every_units_transfers(wavefront):
    """A pool rank runs its units one after another on one stream, each unit's receive and send between its attention
    kernels: where the pool decides the layer (its attention far longer than the base's work), each of the M units
    adds both transfers, whichever order the base issues them in."""
    over = ["strategy=fa_pool_b2_p2", "workload.prompt_lens=[100]", "strategy.micro_batches=2", "strategy.tp=1",
            "strategy.pool.hierarchical=false", "strategy.cuda_graphs=true", "strategy.pool.size=2",
            "strategy.pool.max_size=2", "strategy.world_size=3", f"strategy.pool.wavefront={str(wavefront).lower()}"]
    cfg = small(*over)

    def step(p2p_s):
        table = {**TABLE, "p2p": {"2": [[1, p2p_s], [1 << 40, p2p_s]]}}
        cal = simple_cal(attn_bw_fraction=1e-6, comm={"graph": table, "eager": table})  # the pool's attention decides
        return predict_step(cfg, cal, graphed=True)["step_s"]

    # 2 layers x 2 units x 2 transfers (q out, partials back)
    assert step(2e-5) - step(1e-5) == pytest.approx(cfg.model.n_layers * 2 * 2 * 1e-5, rel=1e-6)


def test_fa_pool_message_cost_is_fitted_where_messages_weigh_most():
    """message_s (the host's handoff per hop) is fitted on a captured FA Pool record of the set's smallest batch: at
    a large batch the pool's attention is most of the step, and a few percent of it would be taken for host time."""
    from harness.calibration import MEASURED_SET, SET_CALIBRATION, measured_items, record_key

    items = {record_key(path, MEASURED_SET): rec for path, rec, _ in measured_items(MEASURED_SET)}
    fitted = items[SET_CALIBRATION["message_s"]]
    captured_pools = [r for r in items.values() if r.config["strategy"]["kind"] == fitted.config["strategy"]["kind"]
                      and all(rank.get("cuda_graphs", False) for rank in r.ranks)]
    assert all(rank.get("cuda_graphs", False) for rank in fitted.ranks)
    assert fitted.config["workload"]["batch_size"] == min(r.config["workload"]["batch_size"] for r in captured_pools)


def _linear(per_byte_s):
    """An NCCL table whose every size takes per_byte_s per byte (log-log interpolation keeps it exact)."""
    return {"2": [[1, per_byte_s], [1 << 40, (1 << 40) * per_byte_s]]}


DCP_PREFILL = ["strategy.prefill_chunk=32", "strategy.kv_block=16", "hardware.peak_tflops=1"]


def test_dcp_prefill_all_to_all_is_priced_by_the_bytes_each_peer_gets():
    """A DCP rank sends each peer of its KV-shard group the fp32 partials (and LSE) of that peer's heads: one rank's
    heads of the chunk's tokens. NCCL's all-to-all is calibrated by the bytes to and from each peer, so that is the
    size it is priced at, not the whole send buffer (k peers' worth)."""
    cfg = small("strategy=dcp_t2_k2", *DCP_PREFILL)
    m = cfg.model

    def prefill(per_byte_s):
        table = {**TABLE, "all_to_all": _linear(per_byte_s)}
        cal = simple_cal(prefill_flops_fraction=1.0, comm={"graph": table, "eager": table})
        return predict_step(cfg, cal)["prefill_s"]

    tokens_by_chunk = [4 * min(32, 100 - start) for start in range(0, 100, 32)]  # 4 rows, chunks of 32
    # one rank's heads of the chunk's tokens, fp32 with the LSE
    per_peer_bytes = [t * (m.hidden // 2) * (m.head_dim + 1) // m.head_dim * 4 for t in tokens_by_chunk]
    assert prefill(2e-12) - prefill(1e-12) == pytest.approx(m.n_layers * sum(per_peer_bytes) * 1e-12, rel=1e-9)


def test_dcp_prefill_charges_the_copies_around_its_exchange_and_tp_none():
    """What a DCP rank copies beyond TP's attention (q, k, v stacked and the gathered shards reordered, the chunk's
    K and V cut into blocks, the partials converted to fp32, packed, ordered by destination, merged and cast back)
    costs its bytes at the prefill copy rate, for every chunk and layer; TP makes none of these copies. The bytes grow
    with the chunk's tokens and with the group's heads (k times a rank's own)."""
    from harness.strategies import spec_of

    tp_cfg, dcp_cfg = small("strategy=tp2_pp1", *DCP_PREFILL), small("strategy=dcp_t2_k2", *DCP_PREFILL)
    fast, slow = simple_cal(prefill_flops_fraction=1.0), simple_cal(prefill_flops_fraction=1.0,
                                                                     prefill_pool_copy_bw_fraction=0.5)
    assert predict_step(tp_cfg, slow)["prefill_s"] == pytest.approx(predict_step(tp_cfg, fast)["prefill_s"], rel=1e-12)
    spec, s, m = spec_of(dcp_cfg.strategy), dcp_cfg.strategy, dcp_cfg.model
    tokens_by_chunk = [4 * min(32, 100 - start) for start in range(0, 100, 32)]
    copied = sum(spec.exchange_copy_bytes(s, t, m.hidden, 4) for t in tokens_by_chunk)
    extra = predict_step(dcp_cfg, slow)["prefill_s"] - predict_step(dcp_cfg, fast)["prefill_s"]
    assert extra == pytest.approx(m.n_layers * copied / 1e12, rel=1e-9)  # at half the rate: twice the time
    one = 128 * m.hidden // s.tp * 4  # a rank's q (or k or v) of 128 tokens
    assert spec.exchange_copy_bytes(s, 256, m.hidden, 4) == 2 * spec.exchange_copy_bytes(s, 128, m.hidden, 4)
    wider = dataclasses.replace(s, tp=4, kv_shards=4)  # the same heads per rank, twice the group
    assert spec.exchange_copy_bytes(wider, 128, 2 * m.hidden, 4) > spec.exchange_copy_bytes(s, 128, m.hidden, 4)
    assert spec.exchange_copy_bytes(s, 128, m.hidden, 4) > 12 * s.kv_shards * one  # the gather's and partials' passes


FA_POOL_PREFILL = ["strategy=fa_pool_b2_p2", "strategy.pool.threshold=8", "strategy.pool.block_size=16",
                   "strategy.prefill_chunk=32", "hardware.peak_tflops=1", "workload.prompt_lens=[128]"]


def test_fa_pool_prefill_base_and_pool_take_turns_unless_in_groups():
    """FA Pool's prefill: the base's dense layers, then the pool's attention over the earlier chunks (and the
    messages both ways) each layer, one after the other; in groups the two sides overlap, so it is faster, but
    never faster than the base's dense work alone."""
    over = FA_POOL_PREFILL
    cal = simple_cal(prefill_flops_fraction=1.0)
    turns = predict_step(small(*over, "strategy.pool.prefill_micro_batches=1"), cal)["prefill_s"]
    groups = predict_step(small(*over, "strategy.pool.prefill_micro_batches=2"), cal)["prefill_s"]
    slow_messages = predict_step(small(*over, "strategy.pool.prefill_micro_batches=1"), simple_cal(prefill_flops_fraction=1.0, comm={
        "graph": FLAT["graph"], "eager": {**TABLE, "p2p": {"2": [[1, 1e-3], [1 << 40, 1e-3]]}}}))["prefill_s"]
    dense_only = 2 * 4 * 128 * 2 * (4 * 64 * 64 + 2 * 64 * 256) / 1e12 / 2  # 2 layers, 4 x 128 tokens, TP2 base
    assert dense_only < groups < turns < slow_messages
    # the messages: out and back per layer and chunk after the first, only out in the first: 4 chunks, 2 layers
    assert slow_messages - turns == pytest.approx(2 * (4 + 3) * (1e-3 - 5e-5), rel=1e-6)


def test_fa_pool_prefill_copy_rates_fitted_on_two_records_come_back():
    """The rates of FA Pool's prefill copies (perfmodel._fit_prefill_copies): TTFTs predicted with known rates, on
    a record the pool side decides (2+2 in one group) and one the base decides (1+3 in groups), give those rates
    back; slower copies make a longer prefill."""
    from harness.calibration import _fit_prefill_copies, with_limits

    over = FA_POOL_PREFILL
    pool_decided = small(*over, "strategy.pool.prefill_micro_batches=1")
    base_decided = small(*over, "strategy.tp=1", "strategy.pool.size=3", "strategy.pool.max_size=3",
                         "strategy.world_size=4", "strategy.pool.prefill_micro_batches=2")
    quick = {op: {"2": [[1, 1e-7], [1 << 40, 1e-7]]} for op in ("all_reduce", "all_gather", "p2p")}
    lim = {"read_bytes_per_s": {"used": 1e12}, "comm": {"graph": quick, "eager": quick}}
    truth = simple_cal(prefill_flops_fraction=1.0, prefill_pool_copy_bw_fraction=0.5, prefill_base_copy_bw_fraction=0.2)
    ttft = [predict_step(c, with_limits(truth, lim))["prefill_s"] for c in (pool_decided, base_decided)]
    slower = dataclasses.replace(truth, prefill_pool_copy_bw_fraction=0.25, prefill_base_copy_bw_fraction=0.1)
    assert all(predict_step(c, with_limits(slower, lim))["prefill_s"] > t for c, t in zip((pool_decided, base_decided), ttft))
    cal = simple_cal(prefill_flops_fraction=1.0)
    _fit_prefill_copies(cal, (pool_decided, ttft[0], lim), (base_decided, ttft[1], lim))
    assert cal.prefill_pool_copy_bw_fraction == pytest.approx(0.5, rel=1e-3)
    assert cal.prefill_base_copy_bw_fraction == pytest.approx(0.2, rel=1e-3)


def test_fa_pool_message_transfer_is_nccl_in_graph_time_not_its_eager_host_time():
    """A hop's transfer is priced at NCCL's in-graph time for its bytes; its host cost is message_s alone (NCCL's
    eager time is host-bound and would count the host twice)."""
    over = ["strategy=fa_pool_b2_p2", "strategy.micro_batches=1", "strategy.cuda_graphs=true", "strategy.tp=1",
            "strategy.pool.hierarchical=false", "strategy.pool.size=2", "strategy.pool.max_size=2", "strategy.world_size=3"]
    cfg = small(*over)
    slow_eager = {**TABLE, "p2p": {"2": [[1, 9e-3], [1 << 40, 9e-3]]}}
    slow_graph = {**TABLE, "p2p": {"2": [[1, 7e-3], [1 << 40, 7e-3]]}}
    base = predict_step(cfg, simple_cal(), graphed=True)["step_s"]
    assert predict_step(cfg, simple_cal(comm={"graph": TABLE, "eager": slow_eager}), graphed=True)["step_s"] == \
        pytest.approx(base, rel=1e-12)
    slower = predict_step(cfg, simple_cal(comm={"graph": slow_graph, "eager": TABLE}), graphed=True)["step_s"]
    assert slower - base == pytest.approx(cfg.model.n_layers * 2 * (7e-3 - 5e-5), rel=1e-9)  # 2 hops a layer


def test_layer_floor_counts_the_small_kernels_the_engines_launch(tmp_path):
    """A call whose engines ran RMSNorm and rotary unfused (kernels.json) pays a kernel's floor for each of their
    extra kernels in every layer; a call without the file ran the fused ones."""
    import json

    from harness.calibration import SMALL_KERNELS_PER_LAYER, limits_of, with_limits

    assert SMALL_KERNELS_PER_LAYER["unfused"] > SMALL_KERNELS_PER_LAYER["fused"]
    limits = {"read_bytes_per_s": {"used": 1e12}, "comm": FLAT}
    for call in ("old", "new"):
        (tmp_path / call / "records" / "r").mkdir(parents=True)
        (tmp_path / call / "limits.json").write_text(json.dumps(limits))
    (tmp_path / "old" / "kernels.json").write_text(json.dumps({"norm_rope": "unfused", "why": "before fusing"}))
    old = with_limits(simple_cal(kernel_s=1e-6), limits_of(tmp_path / "old" / "records" / "r" / "result.json"))
    new = with_limits(simple_cal(kernel_s=1e-6), limits_of(tmp_path / "new" / "records" / "r" / "result.json"))
    assert new.layer_fixed_s == pytest.approx(1e-6 * SMALL_KERNELS_PER_LAYER["fused"])
    cfg = small("strategy=tp2_pp1")
    extra = predict_step(cfg, old)["step_s"] - predict_step(cfg, new)["step_s"]
    kernels = SMALL_KERNELS_PER_LAYER["unfused"] - SMALL_KERNELS_PER_LAYER["fused"]
    assert extra == pytest.approx(cfg.model.n_layers * kernels * 1e-6, rel=1e-9)


def _serving_pricer(table_tokens=0, decode_plan="splits", **cal_fields):
    from harness.calibration import default_calibration
    from harness.perfmodel import ServingPricer, serving_config

    cal = dataclasses.replace(default_calibration(), **cal_fields)
    return ServingPricer(serving_config(cfg_object(["model=paper", "hardware=h200", "strategy=reference"])), cal,
                         table_tokens, decode_plan=decode_plan)


def test_a_ragged_decode_pass_pays_its_plan_build_as_its_engine_built_it_for_its_buckets_rows():
    """The ragged plan's build is priced for the rows of the pass's bucket (the plan a graph replays is sized for
    them): today's engines once a pass, the tiles side by side (ragged_plan_pass_s, whatever the rows); records of
    engines whose one program compared the tiles in turn at ragged_plan_tile_s a tile of items x rows, once a pass
    or once a layer."""
    from harness.calibration import default_calibration
    from harness.perfmodel import ServingPricer
    from model.paged_attention import RAGGED_PROGRAMS_PER_SM, plan_kernel_tiles, ragged_plan_sizes
    from model.parallel.static import decode_buckets

    tiles_side_by_side = _serving_pricer(decode_plan="ragged")
    assert tiles_side_by_side.plan_build == "pass_tiles"
    in_turn, per_layer = _serving_pricer(decode_plan="ragged"), _serving_pricer(decode_plan="ragged")
    in_turn.plan_build, per_layer.plan_build = "pass", "layer"
    cfg, tile_s = in_turn.cfg, in_turn.cal.ragged_plan_tile_s
    target, _ = ragged_plan_sizes(cfg.model.n_heads, cfg.hardware.sm_count, programs_per_sm=RAGGED_PROGRAMS_PER_SM)
    buckets = decode_buckets(cfg.serving.max_batch)
    assert in_turn.graphed and len(buckets) > 2
    for rows in (1, buckets[-2] - 1, buckets[-1]):
        bucket = next(b for b in buckets if b >= rows)
        build = plan_kernel_tiles(bucket, bucket + target) * tile_s
        assert in_turn.spec.plan_build_s(in_turn, rows) == pytest.approx(build)
        assert tiles_side_by_side.spec.plan_build_s(tiles_side_by_side, rows) == pytest.approx(
            tiles_side_by_side.cal.ragged_plan_pass_s)
        extra = per_layer.decode_totals_s(rows, 300 * rows, 300) - in_turn.decode_totals_s(rows, 300 * rows, 300)
        assert extra == pytest.approx((cfg.model.n_layers - 1) * build)
    assert plan_kernel_tiles(256, 256 + target) > 3 * plan_kernel_tiles(16, 16 + target)  # it grows with the rows
    assert _serving_pricer(decode_plan="splits").spec.plan_build_s(_serving_pricer(decode_plan="splits"), 256) == 0
    with pytest.raises(ValueError, match="plan_build='once'"):
        ServingPricer(cfg, default_calibration(), plan_build="once")


def test_serving_prefill_pass_runs_its_gemms_on_rows_padded_to_the_longest_chunk():
    price = _serving_pricer(serving_prefill_host_layer_s=0.0)  # the device's work (the host's floor aside)
    two = lambda lens: price.step([0] * len(lens), lens, [False] * len(lens), (), ())  # noqa: E731
    # GEMMs: 2 x 2048 positions either way; attention differs by the second row's own keys (64 against 2048)
    assert 0.9 * two([2048, 2048]) < two([2048, 64]) < two([2048, 2048])
    assert two([2048, 64]) > 1.8 * two([2048])  # not 2112 tokens' worth: about 2 x 2048


def test_serving_decode_attention_takes_the_longest_program_of_the_table_wide_splits():
    import numpy as np

    ctx = np.array([6000])
    # one row: 64 splits of a 87,616-token table are 1,408 tokens each, longer to walk than the row's KV is to
    # stream; in a 8,192-token table, splits of 512 tokens are not
    wide, narrow = _serving_pricer(87616), _serving_pricer(8192)
    assert wide.longest_program_s(1, 6000, 6000) == 1408 * wide.cal.paged_token_s
    assert narrow.longest_program_s(1, 6000, 6000) == 512 * narrow.cal.paged_token_s
    assert wide.decode_s(ctx, [False]) > narrow.decode_s(ctx, [False])
    bare = _serving_pricer(87616, paged_token_s=0.0, serving_layer_s=0.0)
    layers = bare.cfg.model.n_layers
    assert wide.decode_s(ctx, [False]) == pytest.approx(bare.decode_s(ctx, [False]) + layers * (
        1408 * wide.cal.paged_token_s - (bare.decode_s(ctx, [False]) - bare.decode_totals_s(1, 0, 6000)) / layers
        + wide.cal.serving_layer_s))


def test_ragged_plan_floor_is_a_chunk_of_the_pass_total_whatever_the_table():
    import torch

    from model.paged_attention import RAGGED_PROGRAMS_PER_SM, RaggedPlan

    wide, narrow = _serving_pricer(87616, "ragged"), _serving_pricer(8192, "ragged")
    token_s = wide.cal.paged_token_s
    # one 6,000-token row: the plan's minimum chunk, in a wide table as in a narrow one
    assert wide.longest_program_s(1, 6000, 6000) == narrow.longest_program_s(1, 6000, 6000) == 512 * token_s
    # a 128K row among 63 rows of 1K: the long row is cut into chunks of the pass's total over the target items,
    # the chunk RaggedPlan builds for these lengths (torch path, 132 SMs, 32 heads)
    lens = [131072] + [1024] * 63
    plan = RaggedPlan(len(lens), 131072 // 64, 64, 32, 132, "cpu", programs_per_sm=RAGGED_PROGRAMS_PER_SM)
    plan.build(torch.tensor(lens, dtype=torch.int32))
    assert wide.longest_program_s(64, 131072, sum(lens)) == int(plan.chunk) * token_s
    assert wide.longest_program_s(64, 131072, sum(lens)) < wide.longest_program_s(64, 131072, 131072 * 64)
    # the split plan of the same pass walks a split of the table's width
    assert _serving_pricer(131072).longest_program_s(64, 131072, sum(lens)) > wide.longest_program_s(64, 131072, sum(lens))


def test_serving_decode_terms_are_the_fit_on_the_measured_serving_steps():
    from harness.calibration import SERVING_DECODE_SET, Calibration
    from harness.serving.virtual import fit_serving_decode

    token_s, layer_s = fit_serving_decode(SERVING_DECODE_SET)
    assert (Calibration.paged_token_s, Calibration.serving_layer_s) == pytest.approx((token_s, layer_s), rel=5e-3)


def test_serving_prefill_pass_is_no_shorter_than_its_host_launches():
    price = _serving_pricer()
    floor = price.cfg.model.n_layers * price.cal.serving_prefill_host_layer_s
    device = _serving_pricer(serving_prefill_host_layer_s=0.0)
    short, long = ([0], [64], [False]), ([60000], [2048], [False])
    assert device.step(*short, (), ()) < floor and price.step(*short, (), ()) == floor
    assert device.step(*long, (), ()) > floor and price.step(*long, (), ()) == device.step(*long, (), ())
    # the decode pass of a mixed step follows the prefill pass, host-bound or not
    ctx = [5000, 9000]
    assert price.step(*short, ctx, [False] * 2) == pytest.approx(floor + price.decode_s(ctx, [False] * 2))


def test_a_small_prefill_pass_replayed_from_its_bucket_graph_has_no_host_floor():
    """Where the engine replays small passes from token-count bucket graphs (prefill_graph_rows: the fewest rows
    it replays), they take no host launch time and attend through one mask; a pass past the bucket sizes, or of
    fewer rows than a record's engine replayed, runs eagerly."""
    from harness.serving.virtual import engines_prefill_graph_rows, recorded_prefill_graph_rows
    from model.parallel.serving_kv import ROWS_ONE_BY_ONE

    price = _serving_pricer()
    price.prefill_graph_rows = engines_prefill_graph_rows()
    assert price.prefill_graph_rows == 1
    floor = price.cfg.model.n_layers * price.cal.serving_prefill_host_layer_s
    device = _serving_pricer(serving_prefill_host_layer_s=0.0)
    small, one_row, wide = ([0] * 4, [64, 32, 100, 16], [False] * 4), ([0], [64], [False]), ([0] * 4, [2048] * 4, [False] * 4)
    assert price.prefill_bucket(*one_row[:2]) is not None and price.prefill_bucket(*wide[:2]) is None

    def padded(pass_):  # the pass as its bucket's graph runs it: rows, chunk width and keys padded, through one mask
        rows, width, keys = price.prefill_bucket(*pass_[:2])
        return device.spec.serving_prefill_s(device.cfg, device.cal, device.links, device.bw, device.flops, device.b,
                                             device.gpn, [keys - width] * rows, [width] * rows, [False] * rows,
                                             one_mask=True)

    assert price.prefill_bucket(*small[:2]) == (4, 128, 128) and price.prefill_bucket(*one_row[:2]) == (1, 64, 64)
    assert price.step(*small, (), ()) == padded(small) < floor
    # a replayed one-row pass attends through one mask (the bucket graph's path), not row by row
    assert price.step(*one_row, (), ()) == padded(one_row) != device.step(*one_row, (), ())
    # records: this engine's rule, the rule of engines that replayed only passes through one mask, none
    rows = [recorded_prefill_graph_rows(type("Rec", (), {"serving": s})) for s in
            ({"prefill_graph_rows": 1}, {"prefill_graphs": True}, {})]
    assert rows == [1, ROWS_ONE_BY_ONE + 1, 0]
    price.prefill_graph_rows = ROWS_ONE_BY_ONE + 1
    assert price.prefill_bucket(*one_row[:2]) is None and price.step(*one_row, (), ()) == floor
    price.prefill_graph_rows = 0  # records of engines that ran every prefill pass eagerly
    assert price.step(*small, (), ()) == floor


def test_serving_prefill_through_one_mask_spans_every_row_to_the_longest():
    from harness.strategies.static import StaticSpec
    from model.parallel.serving_kv import ROWS_ONE_BY_ONE

    price = _serving_pricer(serving_prefill_host_layer_s=0.0)
    spec = price.spec
    rows = lambda starts, lens: price.step(starts, lens, [False] * len(lens), (), ())  # noqa: E731
    assert not spec.serving_prefill_masked(ROWS_ONE_BY_ONE) and spec.serving_prefill_masked(ROWS_ONE_BY_ONE + 1)
    # three rows: a chunk after 40K cached tokens beside two new short prompts. Through one mask every row gathers
    # and attends over the 42K keys the pass spans, so the pass costs more than the long row alone and more than
    # the same rows attended one by one; the short rows' cost grows with the long row's start
    starts, lens = [40000, 0, 0], [2048, 24, 25]
    assert rows(starts, lens) > rows(starts[:1], lens[:1]) + rows(starts[1:], lens[1:])
    assert rows([80000, 0, 0], lens) - rows([80000], [2048]) > rows(starts, lens) - rows([40000], [2048])
    one_by_one = pytest.MonkeyPatch()
    one_by_one.setattr(StaticSpec, "serving_prefill_masked", lambda self, n: False)
    try:
        by_row = rows(starts, lens)
    finally:
        one_by_one.undo()
    assert rows(starts, lens) > 1.5 * by_row
    # the price of the masked work: rows x longest chunk x keys spanned, at the masked rate
    fast = _serving_pricer(serving_prefill_host_layer_s=0.0, masked_attn_flops_fraction=1.0)
    slow = _serving_pricer(serving_prefill_host_layer_s=0.0, masked_attn_flops_fraction=0.5)
    m = price.cfg.model
    pairs = 3 * 2048 * 42048
    assert slow.step(starts, lens, [False] * 3, (), ()) - fast.step(starts, lens, [False] * 3, (), ()) == pytest.approx(
        m.n_layers * 4 * m.hidden * pairs / fast.flops, rel=1e-9)


def _kind_pricer(strategy, *overrides, **cal_fields):
    from harness.calibration import default_calibration
    from harness.perfmodel import ServingPricer, serving_config

    cal = dataclasses.replace(default_calibration(), **{"serving_prefill_host_layer_s": 0.0, **cal_fields})
    return ServingPricer(serving_config(cfg_object(["model=paper", "hardware=h200", f"strategy={strategy}",
                                                    *overrides])), cal)


def _masked_work_s(strategy, starts, lens, pooled, *overrides):
    """The part of a prefill pass's price that the masked kernel's rate decides (a rate of 1 against 0.5)."""
    slow, fast = (_kind_pricer(strategy, *overrides, masked_attn_flops_fraction=f) for f in (0.5, 1.0))
    return slow.step(starts, lens, pooled, (), ()) - fast.step(starts, lens, pooled, (), ())


def test_dcp_serving_prefill_attends_through_one_mask_of_its_shard_at_any_row_count():
    # model/parallel/dcp.ShardedServingAttention: every pass, one row or many, through one mask over the shard's
    # 1/k of the keys for k times the heads: per rank, TP's heads over every key the pass spans
    price = _kind_pricer("dcp_t4_k2")
    m = price.cfg.model
    assert price.spec.serving_prefill_masked(1)
    for starts, lens in (([40000], [2048]), ([40000, 0, 0], [2048, 24, 25])):
        pairs = len(lens) * max(lens) * max(a + q for a, q in zip(starts, lens))
        assert _masked_work_s("dcp_t4_k2", starts, lens, [False] * len(lens)) == pytest.approx(
            m.n_layers * 4 * m.hidden // price.cfg.strategy.tp * pairs / price.flops, rel=1e-9)


def test_fa_pool_serving_prefill_prices_the_bases_own_span_and_each_pool_ranks_share():
    # model/parallel/fa_pool_serving: the base attends through one mask over the span of the rows it holds (a pooled
    # row's keys are the pool's); a pool rank over its blocks of the pooled rows (pool_keys_per_rank), every head
    pool = ["strategy.pool.size=8", "strategy.pool.threshold=32768", "strategy.pool.tokens_per_rank=16384"]
    price = _kind_pricer("fa_pool", *pool)
    m, s = price.cfg.model, price.cfg.strategy
    starts, lens, pooled = [80000, 0, 0], [2048, 24, 25], [True, False, False]
    keys = price.spec.pool_keys_per_rank(price.cfg, 82048)
    assert keys == 16384  # the proportional policy: tokens_per_rank on a rank before the next
    # its base runs every prefill pass eagerly: a short one takes the host's launches
    launched = _kind_pricer("fa_pool", *pool, serving_prefill_host_layer_s=2e-3)
    assert launched.step([0], [16], [False], (), ()) == pytest.approx(m.n_layers * 2e-3)
    assert price.step([0], [16], [False], (), ()) < m.n_layers * 2e-3
    # the chunk [80000, 82048) crosses from the rank holding [65536, 81920) to the next: two ranks store it
    assert (price.spec.pool_ranks_storing(price.cfg, 80000, 2048), price.spec.pool_ranks_storing(price.cfg, 0, 2048)) == (2, 1)
    base_pairs, pool_pairs = 3 * 2048 * 25, 2048 * keys
    want = m.n_layers * 4 * m.hidden * (base_pairs / s.tp + pool_pairs) / price.flops
    assert _masked_work_s("fa_pool", starts, lens, pooled, *pool) == pytest.approx(want, rel=1e-9)
    # round robin over 8 ranks: each holds an eighth of the row's blocks; over 16, a sixteenth
    robin = [*pool, "strategy.pool.policy=all"]
    for size in (8, 16):
        cfg = _kind_pricer("fa_pool", *robin, f"strategy.pool.size={size}").cfg
        bs = cfg.serving.block_size
        assert price.spec.pool_keys_per_rank(cfg, 82048) == -(-(-(-82048 // bs)) // size) * bs


def test_first_pass_of_a_decode_bucket_runs_eagerly_then_is_captured():
    price = _serving_pricer()
    walk = price.eager_decode_host_s()
    assert walk == price.cfg.model.n_layers * price.cal.eager_cpu_s_per_layer
    ctx = [3000] * 9
    dec = price.decode_s(ctx, [False] * 9)
    assert dec < walk  # a small pass: its eager run is the host's walk
    assert price.step((), (), (), ctx, [False] * 9, capture=True) == pytest.approx(2 * walk)
    # beside a prefill pass the eager launches follow the prefill's on the host, its kernels the prefill's on the device
    pre = ([60000], [2048], [False])
    t = price.step(*pre, (), ())
    host = price.cfg.model.n_layers * price.cal.serving_prefill_host_layer_s
    assert price.step(*pre, ctx, [False] * 9, capture=True) == pytest.approx(max(t + dec, host + walk) + walk)
    assert price.bucket(3) == 4 and price.bucket(1) == 1
    # a pipeline's decode passes run eagerly every step: no bucket, no capture
    from harness.perfmodel import ServingPricer, serving_config

    assert ServingPricer(serving_config(cfg_object(["model=paper", "hardware=h200", "strategy=tp8_pp2"])),
                         price.cal).bucket(3) is None


def test_serving_host_terms_are_the_fit_on_the_measured_serving_steps():
    from harness.calibration import SERVING_HOST_SET, Calibration
    from harness.serving.virtual import fit_masked_attention, fit_serving_prefill_host

    assert Calibration.serving_prefill_host_layer_s == pytest.approx(fit_serving_prefill_host(SERVING_HOST_SET), rel=5e-3)
    assert Calibration.masked_attn_flops_fraction == pytest.approx(fit_masked_attention(SERVING_HOST_SET), rel=5e-3)


def test_the_plan_build_term_is_the_fit_on_the_profiled_decode_steps():
    from harness.calibration import RAGGED_PLAN_SET
    from harness.serving.virtual import fit_ragged_plan_tile

    assert Calibration.ragged_plan_tile_s == pytest.approx(fit_ragged_plan_tile(RAGGED_PLAN_SET), rel=5e-3)


def test_the_serving_prefill_rates_are_the_fit_on_the_profiled_prefill_passes():
    from harness.calibration import SERVING_PREFILL_SET
    from harness.serving.virtual import fit_serving_prefill_parts

    attn, gather, passes = fit_serving_prefill_parts(SERVING_PREFILL_SET)
    assert Calibration.serving_prefill_attn_flops_fraction == pytest.approx(attn, rel=5e-3)
    assert Calibration.serving_gather_bw_fraction == pytest.approx(gather, rel=5e-3)
    assert Calibration.serving_prefill_elementwise_passes == pytest.approx(passes, rel=5e-3)


def test_a_serving_prefill_pass_is_priced_by_its_parts():
    """GEMMs over the padded positions at the GEMM rate, attention at its own fraction of it, the cached keys'
    gather (two copies) and the elementwise rest at the bandwidth: each term moves the price as its rate says."""
    price = _serving_pricer(serving_prefill_host_layer_s=0.0)
    starts, lens = [40_000, 100], [2048, 30]
    base = price.step(starts, lens, [False, False], [], [])
    faster_attn = _serving_pricer(serving_prefill_host_layer_s=0.0, serving_prefill_attn_flops_fraction=
                                  2 * price.cal.serving_prefill_attn_flops_fraction).step(starts, lens, [False] * 2, [], [])
    m, layers = price.cfg.model, price.cfg.model.n_layers
    attn_s = layers * sum(4 * m.hidden * q * a + 4 * m.hidden * q * (q + 1) / 2 for q, a in zip(lens, starts)) / (
        price.flops * price.cal.serving_prefill_attn_flops_fraction)
    assert base - faster_attn == pytest.approx(attn_s / 2, rel=1e-6)
    no_gather = _serving_pricer(serving_prefill_host_layer_s=0.0, serving_gather_bw_fraction=1e12).step(
        starts, lens, [False] * 2, [], [])
    gathered = layers * sum(a + q for a, q in zip(starts, lens)) * 2 * m.hidden * price.b
    assert base - no_gather == pytest.approx(4 * gathered / (price.bw * price.cal.serving_gather_bw_fraction), rel=1e-6)
    no_rest = _serving_pricer(serving_prefill_host_layer_s=0.0, serving_prefill_elementwise_passes=0.0).step(
        starts, lens, [False] * 2, [], [])
    rest = layers * price.cal.serving_prefill_elementwise_passes * 2 * 2048 * m.hidden * price.b / price.bw
    assert base - no_rest == pytest.approx(rest, rel=1e-6)


def test_the_side_by_side_build_term_is_the_median_of_the_benchmarked_builds(tmp_path):
    import json

    from harness.calibration import RAGGED_PLAN_BUILD_SET
    from harness.serving.virtual import fit_ragged_plan_build

    assert Calibration.ragged_plan_pass_s == pytest.approx(fit_ragged_plan_build(RAGGED_PLAN_BUILD_SET), rel=5e-3)
    points = [{"plan": "ragged_x4", "plan_us": 3.0}, {"plan": "ragged", "plan_us": 100.0},
              {"plan": "ragged_x4", "plan_us": 5.0}, {"plan": "ragged_x4", "plan_us": 40.0}, {"plan": "splits"}]
    (tmp_path / "ragged.json").write_text(json.dumps({"points": points}))
    assert fit_ragged_plan_build(tmp_path) == pytest.approx(5e-6)  # the engines' variant only
    (tmp_path / "ragged.json").write_text(json.dumps({"points": points[1:2]}))
    with pytest.raises(ValueError, match="no ragged_x4 point"):
        fit_ragged_plan_build(tmp_path)


def test_a_set_takes_from_the_committed_calibration_what_its_records_cannot_fit():
    """FA Pool's host cost per eager exchange belongs to the host and NCCL, its prefill copy rates to today's engine,
    the prefill's FLOP rate to the GPU's kernels: a measured set that holds no record to fit one of them is checked
    with the committed value, not with none (0 s, the read bandwidth, the GEMM rate)."""
    from harness.calibration import default_calibration
    from harness.perfmodel_check import calibrated_items
    from tests.conftest import ROOT

    committed, bare = default_calibration(), Calibration()
    _, cal = calibrated_items(ROOT / "results" / "measured" / "h100-x4" / "prefill")
    assert committed.message_s > bare.message_s == 0 and cal.message_s == committed.message_s
    assert cal.eager_unit_s == committed.eager_unit_s and not any("fa_pool" in k for k in cal.calibration_records)
    for field in ("prefill_pool_copy_bw_fraction", "prefill_base_copy_bw_fraction"):
        assert getattr(cal, field) == getattr(committed, field) != getattr(bare, field)
    # the prefill's FLOP rate: this set fits its own (it holds reference prefills); one without them takes the committed
    _, profiled = calibrated_items(ROOT / "results" / "measured" / "h100-x4" / "prefill_profile")
    assert cal.prefill_flops_fraction != committed.prefill_flops_fraction
    assert profiled.prefill_flops_fraction == committed.prefill_flops_fraction != bare.prefill_flops_fraction


def test_the_serving_check_leaves_out_a_replay_whose_trace_is_missing_or_other_and_says_why(tmp_path):
    """A measured replay whose trace is not on this machine, or whose file gives other requests than its record's,
    is left out of the check's table with the reason, and the other replays are checked."""
    import json
    import shutil

    from harness.serving.virtual import check_serving

    src = ROOT / "results" / "measured" / "h100-x1" / "serve_pass_plan" / "rates"
    shutil.copy(src / "bench_serving.json", tmp_path / "bench_serving.json")
    for rate, path, first_n in (("0.5", None, None), ("1", "/nowhere/no_such_trace.jsonl", 600),
                                ("2", "results/reference/traces/azure_conv_sample.csv", None)):
        shutil.copytree(src / "records" / f"rate_{rate}", tmp_path / "records" / f"rate_{rate}")
        if path:
            rec_file = tmp_path / "records" / f"rate_{rate}" / "result.json"
            rec = json.loads(rec_file.read_text())
            rec["config"]["workload"]["trace"]["path"] = path
            if first_n:
                rec["config"]["workload"]["trace"]["first_n"] = first_n
            else:
                rec["config"]["workload"]["trace"]["format"] = "azure"
            rec_file.write_text(json.dumps(rec))
    table = check_serving(tmp_path)
    assert list(table.record) == ["records/rate_0.5"]
    why = dict(table.attrs["skipped"])
    assert set(why) == {"records/rate_1", "records/rate_2"}
    assert "no such file" in why["records/rate_1"] and "other requests than the record's" in why["records/rate_2"]


def test_the_tile_fit_refuses_a_replay_whose_plan_ran_a_program_per_tile():
    from harness.serving.virtual import fit_ragged_plan_tile

    with pytest.raises(ValueError, match="program a tile"):
        fit_ragged_plan_tile(ROOT / "results" / "measured" / "h100-x1" / "serve_pass_plan" / "closed256")
