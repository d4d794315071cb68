import pytest
import torch

from model.attention import BackendUnavailable, attention, backend_available, check_backend, merge_partials

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                reason="needs CUDA")])]


def rand_qkv(b=3, h=4, tq=1, tk=37, d=16, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(device, dtype) for t in (tq, tk, tk)]


def test_math_matches_explicit_softmax():
    q, k, v = rand_qkv(tq=2)
    out, lse = attention(q, k, v, backend="math")
    scores = q @ k.transpose(-1, -2) / 4.0
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)
    assert torch.allclose(out, scores.softmax(-1) @ v, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn"])
@pytest.mark.parametrize("case", ["decode_ragged", "decode_full", "prefill_causal"])
def test_backends_agree_with_math(device, backend, case):
    if not backend_available(backend, device):
        pytest.skip(f"{backend} not available on {device}")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tq = 5 if case == "prefill_causal" else 1
    q, k, v = rand_qkv(tq=tq, tk=5 if case == "prefill_causal" else 37, device=device, dtype=dtype)
    lens = None if case == "decode_full" else torch.tensor([5, 1, 3] if tq > 1 else [37, 1, 20], device=device)
    if backend == "sdpa_flash" and lens is not None:
        pytest.skip("flash takes no mask")
    causal = case == "prefill_causal"
    ref_out, ref_lse = attention(q, k, v, lens, causal, backend="math")
    out, lse = attention(q, k, v, lens, causal, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if causal:  # rows past a sequence's length are padding: compare the real ones
        for b, n in enumerate(lens.tolist()):
            assert torch.allclose(out[b, :, :n].float(), ref_out[b, :, :n].float(), atol=tol)
            assert torch.allclose(lse[b, :, :n], ref_lse[b, :, :n], atol=tol)
    else:
        assert torch.allclose(out.float(), ref_out.float(), atol=tol)
        assert torch.allclose(lse, ref_lse, atol=tol)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_empty_rows_have_zero_out_and_minus_inf_lse(backend):
    q, k, v = rand_qkv()
    out, lse = attention(q, k, v, kv_lens=torch.tensor([0, 5, 0]), backend=backend)
    assert torch.isinf(lse[0]).all() and (lse[0] < 0).all() and torch.isinf(lse[2]).all()
    assert (out[0] == 0).all() and torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("n_shards", range(1, 9))
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_merge_partials_equals_unsplit(n_shards, backend):
    q, k, v = rand_qkv(tk=50, seed=n_shards)
    full_out, full_lse = attention(q, k, v, backend="math")
    g = torch.Generator().manual_seed(100 + n_shards)
    # random cut points, repeats allowed, so that some shards are empty
    cuts = sorted(torch.randint(0, 51, (n_shards - 1,), generator=g).tolist())
    bounds = [0] + cuts + [50]
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        o, l = attention(q, k[:, :, lo:hi], v[:, :, lo:hi], backend=backend)
        outs.append(o)
        lses.append(l)
    out, lse = merge_partials(outs, lses)
    assert torch.allclose(out, full_out, atol=1e-5)
    assert torch.allclose(lse, full_lse, atol=1e-5)


def test_merge_with_explicit_empty_shard_and_all_empty():
    q, k, v = rand_qkv()
    o, l = attention(q, k, v)
    e_o, e_l = attention(q, k[:, :, :0], v[:, :, :0])
    out, lse = merge_partials([e_o, o, e_o], [e_l, l, e_l])
    assert torch.allclose(out, o, atol=1e-6) and torch.allclose(lse, l)
    out, lse = merge_partials([e_o, e_o], [e_l, e_l])
    assert (out == 0).all() and torch.isinf(lse).all()


def test_unknown_or_missing_backend_is_refused_by_name():
    with pytest.raises(BackendUnavailable, match="'nope' is unknown"):
        check_backend("nope", "cpu")
    with pytest.raises(BackendUnavailable, match="flash_attn"):
        check_backend("flash_attn", "cpu")


def test_flash_attn_refuses_a_ragged_or_chunked_causal_prefill():
    """flash-attn aligns its causal mask bottom-right; this module's contract is top-left (issue #18). Refused before
    flash-attn is even imported, so the refusal shows on any machine."""
    import pytest
    import torch

    from model.attention import BackendUnavailable, attention

    q = k = v = torch.zeros(2, 1, 4, 8)
    with pytest.raises(BackendUnavailable, match="bottom-right"):
        attention(q, k, v, kv_lens=torch.tensor([4, 2]), causal=True, backend="flash_attn")
    with pytest.raises(BackendUnavailable, match="chunked"):
        attention(q[:, :, :2], k, v, causal=True, backend="flash_attn", q_offset=2)


def test_a_chunk_after_cached_keys_sees_them_all_and_itself_causally():
    """q_offset: the last 3 queries of a 7-token causal prefill, computed as a chunk after 4 cached keys, equal the
    whole prefill's last 3 rows."""
    import torch

    from model.attention import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=gen) for _ in range(3))
    lens = torch.tensor([7, 6])
    whole, _ = attention(q, k, v, kv_lens=lens, causal=True)
    chunk, _ = attention(q[:, :, 4:], k, v, kv_lens=lens, causal=True, q_offset=4)
    torch.testing.assert_close(chunk[0], whole[0, :, 4:])
    torch.testing.assert_close(chunk[1, :, :2], whole[1, :, 4:6])  # the second row's 7th query is padding


def test_square_causal_prefill_builds_no_mask_and_matches_the_masked_path(monkeypatch):
    """Equal-length prompts from an empty cache: the kernel's own causal masking (no T x T mask tensor), the
    same output and LSE as with the lengths' mask."""
    import model.attention as attn

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16) * 3 for _ in range(3))
    masked = attn.attention(q, k, v, kv_lens=torch.tensor([24, 24]), causal=True, backend="sdpa")
    built = []
    real = attn.visible_mask
    monkeypatch.setattr(attn, "visible_mask", lambda *a, **kw: built.append(a[:2]) or real(*a, **kw))
    fast = attn.attention(q, k, v, causal=True, backend="sdpa")
    assert built == []
    torch.testing.assert_close(fast[0], masked[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], masked[1], rtol=1e-5, atol=1e-5)


def test_a_chunk_after_cached_keys_as_two_unmasked_parts_equals_the_masked_math():
    """The CUDA tail path's arithmetic, on the CPU kernels: the chunk over the keys before it (no mask) and over
    itself (causal, square), merged by LSE, is causal attention of the chunk at its offset."""
    import math as m

    from model import attention as A

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, t, 16, generator=gen) for t in (24, 64, 64))
    want_out, want_lse = A.attention(q, k, v, causal=True, backend="math", q_offset=40)
    out, lse = A._prefix_and_own(q, k, v, 1 / m.sqrt(16), "sdpa")
    assert torch.allclose(out, want_out, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)
