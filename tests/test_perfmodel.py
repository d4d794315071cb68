"""The performance model's memory per role, pinned on a hand-computed case (what the engines allocate)."""
from harness.perfmodel import memory_by_role
from tests.conftest import cfg_object


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
