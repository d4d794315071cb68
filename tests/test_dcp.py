"""Decode context parallelism (model/parallel/dcp.py) over gloo on CPU against the single-device reference."""
import pytest
import torch

from harness.config import ConfigError, from_dict
from harness.preflight import memory_by_role
from model.parallel.dcp import shard_length, shard_lengths
from tests.conftest import cfg_object, launch, run_cli

# (tp, kv_shards, pp, prefill_chunk): KV blocks of 16 tokens, ragged prompts of 12-80 tokens (tiny_mixed), so every
# sequence spans several blocks and some shards hold no token of a short prompt's first chunk
CASES = [(2, 2, 1, 0), (4, 2, 1, 16), (4, 4, 1, 0), (4, 4, 1, 32), (2, 2, 2, 16)]


def test_shard_lengths_count_the_blocks_each_shard_holds():
    block = 4
    for shards in (1, 2, 3, 4):
        for n in range(0, 50):
            owner = [(p // block) % shards for p in range(n)]  # round-robin by blocks
            expected = [owner.count(s) for s in range(shards)]
            assert [shard_length(n, s, shards, block) for s in range(shards)] == expected
            assert [int(shard_lengths(torch.tensor([n]), s, shards, block)) for s in range(shards)] == expected


@pytest.mark.slow
@pytest.mark.parametrize("tp,shards,pp,chunk", CASES)
def test_dcp_matches_reference(tp, shards, pp, chunk, tmp_path):
    layers = 4
    rec = launch([f"strategy.name=dcp_t{tp}_k{shards}", "strategy=dcp_t2_k2", f"strategy.tp={tp}", f"strategy.pp={pp}",
                  f"strategy.kv_shards={shards}", f"strategy.world_size={tp * pp}", f"strategy.micro_batches={pp}",
                  f"model.n_layers={layers}", "strategy.kv_block=16", f"strategy.prefill_chunk={chunk}",
                  "model.init_std=0.3", "workload=tiny_mixed", "workload.output_tokens=9", "workload.warmup_steps=1",
                  "check_reference=true"], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    check = rec["reference_check"]
    assert check["passed"] and check["tokens_equal"] and check["steps_compared"] == 9
    assert check["max_rel_logit_error"] < 1e-4 and not check["argmax_flips"]
    assert rec["passes"]["instrumented_tokens_equal"]
    w, m = rec["config"]["workload"], rec["config"]["model"]
    blocks = -(-(max(w["prompt_lens"]) + w["output_tokens"]) // 16)
    local_len = -(-blocks // shards) * 16  # a shard's blocks of the longest sequence
    slots = w["batch_size"] * (local_len // 16 + 1)  # and a spare block per sequence
    heads = m["n_heads"] // tp * shards  # the KV-shard group's heads
    head_dim = m["hidden"] // m["n_heads"]
    ranks = rec["ranks"]
    predicted = {r.role: r.kv_bytes for r in memory_by_role(from_dict(rec["config"]))}  # the perf model's memory
    assert len(ranks) == tp * pp and sorted(r["kv_shard"] for r in ranks) == sorted(list(range(shards)) * (tp * pp // shards))
    for r in ranks:
        assert r["kv_bytes"] == layers // pp * 2 * slots * heads * 16 * head_dim * 4 == predicted[r["role"]]
        # one all-gather of q, k, v and one all-to-all of the partials per layer and forward pass, beside TP's
        # two all-reduces per layer (and the embedding's on stage 0)
        ops = r["comm_ops"]
        passes = ops["dcp_allgather"] // (layers // pp)
        assert ops["dcp_allgather"] == ops["dcp_alltoall"] == passes * layers // pp
        assert ops["tp_allreduce"] == passes * 2 * layers // pp + (passes if r["stage"] == 0 else 0)


def test_dcp_matches_tp_on_one_shard(tmp_path):
    """kv_shards=1 is TP: the same logits as the reference and no DCP traffic."""
    rec = launch(["strategy=dcp_t2_k2", "strategy.name=dcp_t2_k1", "strategy.tp=2", "strategy.kv_shards=1",
                  "strategy.world_size=2", "strategy.kv_block=16", "model.init_std=0.3", "workload=tiny_mixed",
                  "check_reference=true"], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    assert rec["reference_check"]["passed"] and rec["reference_check"]["tokens_equal"]
    assert all("dcp_allgather" not in r["comm_ops"] for r in rec["ranks"])


def test_dcp_run_prints_no_deprecation_warning(tmp_path):
    """The ranks' KV-shard all-gather uses torch's current collective: no FutureWarning on the ranks' stderr."""
    proc, records = run_cli(["hydra.mode=RUN", "strategy=dcp_t2_k2", "workload=tiny", "check_reference=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (rec,) = records
    assert all(r["comm_ops"]["dcp_allgather"] > 0 for r in rec["ranks"])  # the gather ran on every rank
    assert "FutureWarning" not in proc.stderr and "DeprecationWarning" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("overrides,message", [
    (["strategy=dcp_t2_k2", "strategy.tp=4", "strategy.kv_shards=3", "strategy.world_size=4"], "does not divide strategy.tp=4"),
    (["strategy=dcp_t2_k2", "strategy.tp=2", "strategy.kv_shards=0", "strategy.world_size=2"], "kv_shards"),
    (["strategy=tp2_pp1", "strategy.kind=dcp"], "strategy.kind='dcp' but this strategy's schema is kind 'static'"),
])
def test_dcp_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg_object(overrides)


def test_a_field_of_another_kind_is_refused_by_the_schema():
    """kv_shards is DCP's field: a static strategy's schema has no such key, so composition refuses it by name."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="strategy.kv_shards"):
        cfg_object(["strategy=tp2_pp1", "strategy.kv_shards=2"])
    with pytest.raises(ConfigCompositionException, match="strategy.pool"):
        cfg_object(["strategy=dcp_t2_k2", "strategy.pool.size=2"])
