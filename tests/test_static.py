"""Static TP x PP over gloo on CPU against the single-device reference."""
import pytest

from model.config import ModelConfig
from tests.conftest import launch

# TP x PP x pipeline schedule, world size <= 8; KV blocks of 16 tokens, so that every sequence spans several
CASES = [(1, 1, "continuous"), (1, 2, "continuous"), (1, 4, "continuous"), (2, 1, "continuous"), (2, 2, "continuous"),
         (2, 4, "continuous"), (4, 1, "continuous"), (4, 2, "continuous"), (1, 2, "gpipe"), (2, 2, "gpipe")]


def expected_weight_bytes(m: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Bytes a rank of `stage` holds: its blocks sliced over TP (norms whole), embedding/head slices."""
    per_block = 2 * m.hidden + (4 * m.hidden * m.hidden + 2 * m.hidden * m.ffn_hidden) // tp
    n = per_block * m.n_layers // pp
    if stage == 0:
        n += m.vocab_size * m.hidden // tp
    if stage == pp - 1:
        n += m.hidden + m.vocab_size * m.hidden // tp
    return 4 * n


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,schedule", CASES)
def test_static_matches_reference(tp, pp, schedule, tmp_path):
    mb = 2 if pp > 1 else 1
    rec = launch([f"strategy.name=tp{tp}_pp{pp}", "strategy=tp2_pp1", f"strategy.tp={tp}", f"strategy.pp={pp}",
                  f"strategy.world_size={tp * pp}", f"strategy.micro_batches={mb}", "model.n_layers=4",
                  f"strategy.schedule={schedule}", "strategy.kv_block=16", "model.init_std=0.3",
                  "workload.output_tokens=9", "workload.warmup_steps=1", "check_reference=true"], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    check = rec["reference_check"]
    assert check["passed"] and check["tokens_equal"] and check["steps_compared"] == 9
    assert check["max_rel_logit_error"] < 1e-4 and not check["argmax_flips"]
    assert rec["passes"]["instrumented_tokens_equal"]
    s = rec["config"]["strategy"]
    assert (s["kind"], s["tp"], s["pp"], s["world_size"]) == ("static", tp, pp, tp * pp)
    m = ModelConfig(**{**rec["config"]["model"]})
    ranks = sorted(rec["ranks"], key=lambda r: r["rank"])
    assert len(ranks) == tp * pp
    total_kv = sum(r["kv_bytes"] for r in ranks)
    for r in ranks:
        assert r["weight_bytes"] == expected_weight_bytes(m, tp, pp, r["stage"])
        assert r["kv_bytes"] * tp * pp == total_kv  # every rank holds an equal shard of the KV cache
        assert set(r["phase_s"]) == {"attention", "communication", "synchronization", "resource_management", "other"}
    # the KV shards add up to the reference's cache: batch x layers x 2 x heads x max_len x head_dim x 4 bytes
    w = rec["config"]["workload"]
    max_len = -(-(max(w["prompt_lens"]) + w["output_tokens"]) // 16) * 16  # whole blocks
    assert total_kv == w["batch_size"] * m.n_layers * 2 * m.hidden * max_len * 4
    assert sum(r["weight_bytes"] for r in ranks) == 4 * (m.param_count() + (tp - 1) * (2 * m.n_layers + 1) * m.hidden)


@pytest.mark.parametrize("tp,pp,prompts", [(1, 1, "ragged"), (2, 2, "ragged"), (1, 1, "equal"), (2, 2, "equal")])
def test_chunked_prefill_matches_the_reference(tp, pp, prompts, tmp_path):
    """Prompts of 12-80 tokens (ragged) or all of 48 (equal: every chunk full, no length mask) prefilled 16 at a
    time: the same logits and tokens as the plain model's whole-prompt prefill, teacher-forced and free-running."""
    rec = launch([f"strategy.name=tp{tp}_pp{pp}", "strategy=tp2_pp1", f"strategy.tp={tp}", f"strategy.pp={pp}",
                  f"strategy.world_size={tp * pp}", f"strategy.micro_batches={pp}", "model.n_layers=4",
                  "strategy.kv_block=16", "strategy.prefill_chunk=16", "model.init_std=0.3", "workload=tiny_mixed",
                  *(["workload.prompt_lens=[48]"] if prompts == "equal" else []), "check_reference=true"], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    check = rec["reference_check"]
    assert check["passed"] and check["tokens_equal"] and check["max_rel_logit_error"] < 1e-4


def test_chunked_prefill_bounds_the_attention_mask(monkeypatch):
    """Peak attention memory of a prefill: the mask is batch x chunk x length, not batch x length^2 (counted by
    the elements of every mask built, not by time)."""

    import torch
    import torch.distributed as dist

    import model.attention as attn
    from harness.launch import free_port
    from harness.measure import PhaseTimer
    from model.parallel.static import StaticEngine
    from tests.conftest import cfg_object

    sizes = []
    real = attn.visible_mask
    monkeypatch.setattr(attn, "visible_mask", lambda *a, **k: sizes.append(a[:2]) or real(*a, **k))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        prompts = [torch.arange(64) % 50, torch.arange(40) % 50]
        peaks = {}
        for chunk in (0, 16):
            cfg = cfg_object(["strategy=reference", "strategy.kv_block=16", f"strategy.prefill_chunk={chunk}"])
            engine = StaticEngine(cfg.model, cfg.strategy, 0, 1, torch.device("cpu"), torch.float32, "math", PhaseTimer())
            sizes.clear()
            engine.prefill(prompts, 70)
            peaks[chunk] = max(tq * tk for tq, tk in sizes)
    finally:
        dist.destroy_process_group()
    assert peaks[0] == 64 * 64  # whole prompts: length^2
    assert peaks[16] == 16 * 64  # chunks of 16: at most chunk x length


@pytest.mark.parametrize("strategy,block", [("tp1_pp2", "strategy.kv_block=16"), ("fa_pool_b2_p2", "strategy.pool.block_size=8")])
def test_uneven_micro_batches_match_the_reference(strategy, block, tmp_path):
    """4 sequences in 3 micro-batches (2, 1, 1 rows): the pipeline and FA Pool's overlap take any batch."""
    from model.parallel.engine import micro_batches

    assert micro_batches(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert micro_batches(140, 8)[-1] == range(123, 140) and sum(map(len, micro_batches(140, 8))) == 140
    rec = launch([f"strategy={strategy}", "strategy.micro_batches=3", block, "model.init_std=0.3",
                  "workload=tiny_mixed", "check_reference=true"], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    check = rec["reference_check"]
    assert check["passed"] and check["tokens_equal"] and check["max_rel_logit_error"] < 1e-4, check


def test_stage_kv_chunk_keys_are_views_and_the_paged_view_reads_the_same_memory():
    """A chunk's cached keys are views of the cache (no gather, no copy); the paged kernel's strided view, through
    the block table, addresses exactly the dense positions; the DCP spare block sits outside every table entry."""
    import torch

    from model.paged_attention import paged_decode_reference
    from model.parallel.static import StageKV

    batch, heads, max_len, dim, block = 3, 2, 40, 4, 8  # 40 tokens: 5 blocks a row, + 1 spare
    cache = StageKV(2, batch, heads, max_len, dim, block, torch.float32, "cpu", spare=True)
    cache.fill_random(torch.Generator().manual_seed(0))
    keys, values = cache.dense(1, slice(1, 3), 21)
    assert keys.shape == (2, heads, 21, dim) and keys.data_ptr() == cache.kv[1, 0, 1].data_ptr()
    assert keys.untyped_storage().data_ptr() == cache.kv.untyped_storage().data_ptr()
    k_paged, v_paged = cache.paged[1]
    pos = torch.arange(max_len)
    for b in range(batch):
        for h in range(heads):
            slots = cache.table[b, pos // block].long()
            assert torch.equal(k_paged[slots, h, pos % block], cache.kv[1, 0, b, h, :max_len])
            assert torch.equal(v_paged[slots, h, pos % block], cache.kv[1, 1, b, h, :max_len])
    # writes land where dense reads them; a spare write changes nothing a row's attention reads
    ones = torch.ones(2, heads, dim)
    cache.write_token(1, torch.tensor([0, 2]), torch.tensor([5, 33]), ones, ones)
    assert torch.equal(cache.dense(1, slice(0, 1), 6)[0][0, :, 5], torch.ones(heads, dim))
    q, lens = torch.randn(batch, heads, dim), torch.tensor([max_len] * batch, dtype=torch.int32)
    before = paged_decode_reference(q, k_paged, v_paged, cache.table, lens)
    zeros = torch.zeros(batch, heads, dim)
    cache.write_token(1, torch.arange(batch), torch.full((batch,), cache.spare_position), zeros, zeros)
    after = paged_decode_reference(q, k_paged, v_paged, cache.table, lens)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    cache.write_chunk(0, slice(0, 2), 16, torch.full((2, heads, 8, dim), 2.0), torch.full((2, heads, 8, dim), 3.0))
    assert (cache.dense(0, slice(0, 2), 24)[1][:, :, 16:] == 3.0).all()
