"""The fast decode step (static KV, CUDA graph) computes what the plain model computes; the GPU benchmark runs."""
import json

import pytest
import torch

from harness import bench_gpu
from model.config import ModelConfig
from model.gpu_decode import GraphedDecodeStep
from model.transformer import Step, build_model

NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CASES = [("cpu", torch.float32, "math", False),
         pytest.param("cuda", torch.bfloat16, "sdpa_cudnn", True, marks=NEEDS_CUDA),
         pytest.param("cuda", torch.bfloat16, "sdpa_flash", True, marks=NEEDS_CUDA)]


@pytest.mark.parametrize("device,dtype,backend,graph", CASES)
def test_graphed_step_matches_the_plain_model(device, dtype, backend, graph):
    cfg = ModelConfig(n_layers=2, hidden=256, n_heads=2, ffn_hidden=512, vocab_size=512)  # head dim 128
    model = build_model(cfg, dtype, device)
    B, L = 3, 40
    fast = GraphedDecodeStep(model, B, L, backend=backend, graph=graph)
    tokens = torch.tensor([5, 17, 300], device=device)
    out = fast(tokens).clone()
    # the plain model over the same cache contents (its own LocalKV, math attention)
    model.setup_cache(B, L + 1, "math")
    for block, k, v in zip(model.blocks, fast.k, fast.v):
        block.attn.core.k[:, :, :L] = k[:, :, :L]
        block.attn.core.v[:, :, :L] = v[:, :, :L]
    lens = torch.full((B,), L, device=device)
    with torch.no_grad():
        ref = model(tokens[:, None], Step(slice(0, B), lens, torch.ones_like(lens)))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (fast.logits - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())
    assert torch.equal(out, ref.argmax(-1)) or dtype != torch.float32
    if graph:  # a replay with new tokens gives new results, not the captured ones
        fast(torch.tensor([1, 2, 3], device=device))
        assert not torch.equal(fast.logits, ref)


def test_benchmark_smoke_writes_every_section(tmp_path):
    res = bench_gpu.main(["--smoke", "--out", str(tmp_path)])
    for key in ("limits", "attention_shards", "decode_steps", "merge", "gemms", "profile", "prefill"):
        assert res[key], key
    assert [(r["length"], r["chunk"]) for r in res["prefill"]] == [(64, 64), (64, 32)]
    assert all(r["ratio_to_roofline"] > 0 for r in res["prefill"])
    assert all("error" not in r for r in res["decode_steps"])
    assert all(r["ratio_to_read_bw"] > 0 for r in res["attention_shards"])
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["model"] == "tiny"
    assert (tmp_path / "profile.txt").stat().st_size > 0


def test_prefill_flops_by_hand():
    """Tiny model (hidden 64, FFN 256, 2 layers, vocab 512), 3 prompts of 5 tokens."""
    from model.config import PRESETS

    cfg = PRESETS["tiny"]
    dense = 2 * 3 * 5 * 2 * (4 * 64 * 64 + 2 * 64 * 256)  # QKV + out (4 h^2) and up + down (2 h F) per token, layer
    causal = 3 * 2 * sum(4 * 64 * (i + 1) for i in range(5))  # q k^T and p v over keys 0..i
    head = 2 * 3 * 64 * 512  # the LM head on the last position only
    assert bench_gpu.prefill_flops(cfg, 3, 5) == dense + causal + head


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_flash"])
def test_a_full_chunk_after_cached_keys_takes_no_mask_and_equals_the_masked_math(dtype, backend, monkeypatch):
    """A prefill chunk of 96 queries after 160 cached keys, every row full: cuDNN over the keys before and over
    the chunk merged by LSE (`sdpa`), or flash's bottom-right causal mask (`sdpa_flash`), gives the out and LSE
    the math path gives with its explicit mask, and runs with no mask built."""
    from model import attention as A

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, t, 128, device="cuda", generator=gen).to(dtype) for t in (96, 256, 256))
    want_out, want_lse = A.attention(q.float(), k.float(), v.float(), causal=True, backend="math", q_offset=160)
    monkeypatch.setattr(A, "visible_mask", lambda *a, **kw: pytest.fail("a mask was built"))
    out, lse = A.attention(q, k, v, causal=True, backend=backend, q_offset=160)
    assert (out.float() - want_out).abs().max().item() < 2e-2
    assert (lse - want_lse).abs().max().item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_queries_over_keys_before_them_take_cudnn_and_equal_the_math():
    """A pool rank's prefill: a chunk's queries over its blocks of the row, all before the chunk (no mask, not
    causal, Tq != Tk): cuDNN's out and LSE equal the math path's."""
    from model import attention as A

    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(3, 4, t, 128, device="cuda", generator=gen).to(torch.bfloat16) for t in (64, 320, 320))
    want_out, want_lse = A.attention(q.float(), k.float(), v.float(), backend="math")
    out, lse = A.attention(q, k, v, backend="sdpa")
    assert (out.float() - want_out).abs().max().item() < 2e-2 and (lse - want_lse).abs().max().item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_whole_prompt_attention_and_rotary_kernel_equal_the_math(dtype):
    """The CUDA prefill path: a whole causal prompt (cuDNN for half precision, no mask) gives the math path's out
    and LSE; the Triton rotary kernel gives the torch form's result on a permuted (strided) view."""
    import model.transformer as T
    from model import attention as A, rope_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 200, 128, device="cuda", generator=gen).to(dtype) for _ in range(3))
    want_out, want_lse = A.attention(q.float(), k.float(), v.float(), causal=True, backend="math")
    out, lse = A.attention(q, k, v, causal=True, backend="sdpa")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (out.float() - want_out).abs().max().item() < tol and (lse - want_lse).abs().max().item() < tol
    x = torch.randn(3, 50, 3, 6, 128, device="cuda", generator=gen).to(dtype).permute(2, 0, 3, 1, 4)[1]  # [B, H, T, D]
    pos = torch.randint(0, 30000, (3, 50), device="cuda", generator=gen)
    cos, sin = T.rope_tables(pos, 64, 10000.0)
    assert rope_kernel.available(x)
    got = T.apply_rope(x, cos, sin)
    rope_kernel.triton, saved = None, rope_kernel.triton  # the torch form
    try:
        want = T.apply_rope(x, cos, sin)
    finally:
        rope_kernel.triton = saved
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 1e-6  # the kernel may fuse a multiply-add: one rounding apart
    assert got.shape == want.shape and ((got.float() - want.float()).abs() <= ulp * want.float().abs().clamp_min(1)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_merge_of_two_partials_equals_merge_partials(dtype):
    """The Triton merge on strided partials (as cuDNN returns them), with rows where one or both partials saw no
    key, and a token count that is no multiple of its block, against the stacked torch merge."""
    from model import merge_kernel
    from model.attention import merge_partials

    gen = torch.Generator(device="cuda").manual_seed(2)
    a, b = (torch.randn(3, 37, 5, 64, device="cuda", generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    la, lb = (torch.randn(3, 5, 37, device="cuda", generator=gen) * 4 for _ in range(2))
    la[0, :, :3], lb[1, :, 5:9] = float("-inf"), float("-inf")
    la[2, 1, 7] = lb[2, 1, 7] = float("-inf")  # no key on either side
    assert merge_kernel.available(a, b)
    out, lse = merge_kernel.merge_two(a, la, b, lb)
    want_out, want_lse = merge_partials([a, b], [la, lb])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out.float() - want_out.float()).abs().max().item() < tol
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)) and torch.allclose(lse, want_lse, atol=1e-5)
    assert out[2, 1, 7].abs().max().item() == 0
