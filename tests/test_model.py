import pytest
import torch

from model.config import PRESETS, ModelConfig
from model.transformer import Transformer, build_model, generate, recompute_logits


def prompts_for(cfg, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_kv_cache_decode_equals_full_recompute(backend):
    cfg = PRESETS["tiny"]
    model = build_model(cfg)
    prompts = prompts_for(cfg, [5, 13, 1, 9])  # ragged, one of length 1
    tokens, logits = generate(model, prompts, 10, backend)
    full = recompute_logits(model, prompts, tokens, backend)
    assert (logits - full).abs().max() < 1e-5
    assert torch.equal(logits.argmax(-1).T, tokens)


def test_batch_rows_are_independent():
    """A sequence decodes the same alone and inside a ragged batch (padding leaks nothing)."""
    cfg = PRESETS["tiny"]
    model = build_model(cfg)
    prompts = prompts_for(cfg, [7, 20, 3])
    tokens, logits = generate(model, prompts, 6)
    alone_tokens, alone_logits = generate(model, prompts[1:2], 6)
    assert torch.equal(tokens[1:2], alone_tokens)
    assert (logits[:, 1] - alone_logits[:, 0]).abs().max() < 1e-5


def test_weights_are_deterministic_from_seed():
    a, b = build_model(PRESETS["tiny"]), build_model(PRESETS["tiny"])
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = build_model(ModelConfig(seed=1))
    assert not torch.equal(a.blocks[0].attn.wqkv.weight, c.blocks[0].attn.wqkv.weight)


def test_bf16_decode_runs_and_stays_close():
    cfg = PRESETS["tiny"]
    prompts = prompts_for(cfg, [6, 11])
    _, l32 = generate(build_model(cfg), prompts, 4)
    _, l16 = generate(build_model(cfg, torch.bfloat16), prompts, 4)
    assert l16.dtype == torch.float32  # logits are returned in fp32
    assert (l16[0] - l32[0]).abs().max() < 5e-2


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_param_count_equals_sum_of_parameter_sizes(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.param_count() == sum(p.numel() for p in model.parameters())


def test_paper_param_count_is_about_one_billion_not_13():
    n = PRESETS["paper"].param_count()
    assert 1.0e9 < n < 1.1e9  # the README states this against the paper's "~13B"


def test_prefill_runs_the_lm_head_on_each_prompts_last_position_only():
    """Over a whole prompt the LM head would cost T x vocab per row (issue #18): it sees one position per row."""
    import torch

    from model.config import PRESETS
    from model.transformer import build_model, generate

    model = build_model(PRESETS["tiny"])
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    prompts = [torch.arange(5), torch.arange(9) + 3]
    generate(model, prompts, 3)
    assert seen == [(2, 1, model.cfg.hidden)] * 3  # prefill, then 2 decode steps


def test_building_a_model_imports_neither_torch_dynamo_nor_sympy():
    """Every rank builds its model at start: an import of torch._dynamo or sympy there (a draw on the meta device
    goes through torch's Python reference kernels, which import them) would cost each rank process seconds."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from model.config import PRESETS; from model.transformer import build_model; "
            "m = build_model(PRESETS['tiny']); print(sorted({'torch._dynamo', 'sympy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_model_built_off_the_meta_device_draws_its_embedding():
    torch.manual_seed(0)
    weight = Transformer(PRESETS["tiny"]).tok_emb.weight
    assert weight.std().item() == pytest.approx(1.0, abs=0.1) and weight.abs().max().item() > 0
