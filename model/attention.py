"""Attention that returns the output and the log-sum-exp, and the exact merge of partial results.

Every backend has one contract (the flash-attention / xformers one):
    attention(q, k, v, kv_lens, causal) -> (out, lse)
    q: [B, H, Tq, D]   k, v: [B, H, Tk, D]   kv_lens: [B] valid keys per sequence (None = all Tk)
    out: [B, H, Tq, D] (q's dtype)   lse: [B, H, Tq] float32, natural log, scale included
`causal` is top-left aligned (query i sees keys j <= i), which is what prefill from an empty cache needs.
A query that sees no key (an empty KV shard) gets out = 0 and lse = -inf, so that it drops out of a merge.
"""
from __future__ import annotations

import importlib.util
import math

import torch

from model import merge_kernel

BACKENDS = ("math", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn")


class BackendUnavailable(RuntimeError):
    pass


def backend_available(backend: str, device: torch.device | str = "cpu") -> bool:
    device = torch.device(device)
    if backend in ("math", "sdpa"):
        return True
    if backend in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient"):
        return device.type == "cuda"
    if backend == "flash_attn":
        return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return False


def check_backend(backend: str, device: torch.device | str) -> None:
    if backend not in BACKENDS:
        raise BackendUnavailable(f"attention backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if not backend_available(backend, device):
        hint = "install the optional extra: pip install -e '.[flash]' (needs CUDA)" if backend == "flash_attn" else "it needs a CUDA device"
        raise BackendUnavailable(f"attention backend {backend!r} is not available on {device}: {hint}; 'math' and 'sdpa' run everywhere")


def visible_mask(tq: int, tk: int, kv_lens: torch.Tensor | None, causal: bool, device,
                 q_offset: int | torch.Tensor = 0) -> torch.Tensor | None:
    """Boolean [B or 1, 1, Tq, Tk] mask of the keys each query may see, or None when it sees all. Causal: query i
    sits at position q_offset + i and sees keys at positions <= q_offset + i (a prefill chunk after q_offset cached
    tokens). Key j sits at position j."""
    if kv_lens is None and not causal:
        return None
    key_idx = torch.arange(tk, device=device)
    mask = torch.ones(1, 1, tq, tk, dtype=torch.bool, device=device)
    if kv_lens is not None:
        mask = mask & (key_idx[None, :] < kv_lens[:, None])[:, None, None, :]
    if causal:  # q_offset: one int for every row, or [B] (rows of a serving step start at their own positions)
        offset = torch.as_tensor(q_offset, device=device).reshape(-1, 1, 1)
        mask = mask & (key_idx[None, None, :] <= offset + torch.arange(tq, device=device)[None, :, None])[:, None]
    return mask


def _math(q, k, v, mask, scale):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def _aligned_bias(mask, dtype, heads):
    """Additive bias [B, H, Tq, Tk] whose batch stride is a multiple of 8, as the fused CUDA kernels require:
    allocated with Tk rounded up to 8 and sliced back (the heads dimension is broadcast, stride 0)."""
    b, _, tq, tk = mask.shape
    padded = torch.full((b, 1, tq, -(-tk // 8) * 8), float("-inf"), dtype=dtype, device=mask.device)
    bias = padded[..., :tk]
    bias.masked_fill_(mask, 0.0)
    return bias.expand(b, heads, tq, tk)


def _half(q) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16)


def _sdpa(q, k, v, mask, scale, backend, is_causal=False):
    """is_causal (with no mask): the kernels' own causal masking, top-left; only for Tq == Tk, where top-left and
    bottom-right agree."""
    if mask is not None and mask.shape[0] == 1:
        mask = mask.expand(q.shape[0], -1, -1, -1)
    if q.device.type == "cpu":
        bias = None if mask is None else _aligned_bias(mask, q.dtype, 1).contiguous()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=is_causal,
                                                                             attn_mask=bias, scale=scale)
        return out, lse.float()
    if backend == "sdpa":
        # Eager steps change the KV length every step; cuDNN builds a new plan per shape (milliseconds of CPU
        # each), flash has no plan. cuDNN is for fixed shapes: ask for sdpa_cudnn (the CUDA-graphed step in
        # model/gpu_decode.py does).
        # flash takes half precision only; the mem-efficient kernel also fp32
        backend = "sdpa_flash" if mask is None and _half(q) else "sdpa_efficient"
        if backend == "sdpa_flash" and q.shape[2] > 1:
            # prefill (a few shapes per generation, so a few plans): cuDNN's Hopper kernel runs causal prefill
            # attention faster than flash
            backend = "sdpa_cudnn"
    if backend == "sdpa_flash":
        if mask is not None:
            raise BackendUnavailable("sdpa_flash takes no mask: use equal kv lengths, or 'sdpa' / 'sdpa_efficient'")
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, is_causal=is_causal, scale=scale)[:2]
    else:
        bias = None if mask is None else _aligned_bias(mask, q.dtype, q.shape[1])
        op = (torch.ops.aten._scaled_dot_product_cudnn_attention if backend == "sdpa_cudnn"
              else torch.ops.aten._scaled_dot_product_efficient_attention)
        out, lse = op(q, k, v, bias, True, is_causal=is_causal, scale=scale)[:2]
    # kernels differ in the LSE's shape: [B, H, Tq], [B, H, Tq, 1] (cuDNN) or Tq padded (efficient)
    return out, lse.reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]].float()


def _flash_tail(q, k, v, scale):
    """Causal attention of the last Tq of Tk positions (a prefill chunk after Tk - Tq cached keys, every row full):
    flash's causal mask is aligned bottom-right, which is exactly that, so no mask tensor and no masked kernel
    (the mem-efficient kernel with a mask is several times slower)."""
    out, lse = torch.ops.aten._flash_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                                                       None, q.shape[2], k.shape[2], 0.0, True, False, scale=scale)[:2]
    return out.transpose(1, 2), lse.float()


def _prefix_and_own(q, k, v, scale, backend):
    """The same as _flash_tail, from two unmasked kernels: the chunk over the cached keys before it (nothing
    hidden) and over itself (causal, square), merged by LSE. On CUDA both run cuDNN, which takes no bottom-right
    mask but runs faster than flash on Hopper."""
    start = k.shape[2] - q.shape[2]  # views, no copies: cuDNN takes the strides
    before = _sdpa(q, k[:, :, :start], v[:, :, :start], None, scale, backend)
    own = _sdpa(q, k[:, :, start:], v[:, :, start:], None, scale, backend, is_causal=True)
    return merge_pair(before, own)


def _flash_attn(q, k, v, kv_lens, causal, scale):
    from flash_attn import flash_attn_with_kvcache  # optional extra

    cache_seqlens = None if kv_lens is None else kv_lens.to(torch.int32)
    out, lse = flash_attn_with_kvcache(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        cache_seqlens=cache_seqlens, softmax_scale=scale, causal=causal, return_softmax_lse=True,
    )
    return out.transpose(1, 2), lse.float()


def attention(q, k, v, kv_lens=None, causal=False, backend="math", q_offset: int | torch.Tensor = 0):
    """(out, lse) of softmax(q k^T * scale) v over the visible keys. See the module docstring for shapes;
    q_offset: the queries follow that many cached keys (a prefill chunk), for the causal mask; a [B] tensor (each
    row its own, with kv_lens given) for the rows of a serving step."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if k.shape[2] == 0:  # a shard with no keys at all
        return torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), device=q.device)
    if backend == "flash_attn":
        if causal and (kv_lens is not None or q_offset or q.shape[2] != k.shape[2]):
            # flash-attn aligns its causal mask to the bottom right of each sequence's keys; this module's is
            # top-left (query i sees keys j <= i), which ragged or chunked prefill needs
            raise BackendUnavailable("attention backend 'flash_attn' cannot run a ragged or chunked causal prefill "
                                     "(its causal mask is bottom-right aligned); use 'sdpa' or 'math' for prefill")
        out, lse = _flash_attn(q, k, v, kv_lens, causal, scale)
        empty = None if kv_lens is None else (kv_lens == 0).view(-1, 1, 1)
    else:
        by_position = causal and kv_lens is None  # what a query sees: its position alone
        # a whole prompt of equal lengths: the kernel's own causal masking, no mask tensor (T^2) at all
        square = by_position and not q_offset and q.shape[2] == k.shape[2]
        tail = by_position and q_offset and q_offset + q.shape[2] == k.shape[2]  # a full chunk after cached keys
        if tail and q.is_cuda and _half(q) and backend == "sdpa_flash":
            return _flash_tail(q, k, v, scale)
        if tail and q.is_cuda and _half(q) and backend in ("sdpa", "sdpa_cudnn"):
            return _prefix_and_own(q, k, v, scale, backend)
        mask = None if square and backend != "math" else \
            visible_mask(q.shape[2], k.shape[2], kv_lens, causal, q.device, q_offset)
        if backend == "math":
            return _math(q, k, v, mask, scale)
        out, lse = _sdpa(q, k, v, mask, scale, backend, is_causal=square)
        empty = None if mask is None else ~mask.any(-1)  # [B or 1, 1, Tq]
    if empty is not None:  # fused kernels leave queries with no visible key undefined
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse


def masked_attention(q, k, v, mask: torch.Tensor, backend="math"):
    """(out, lse) with an explicit boolean mask [B or 1, 1, Tq, Tk] of the keys each query sees (keys that are not
    in position order: a KV shard's tokens). Queries that see no key get out = 0 and lse = -inf."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "math" or k.shape[2] == 0:
        return _math(q, k, v, mask, scale) if k.shape[2] else attention(q, k, v)
    out, lse = _sdpa(q, k, v, mask, scale, "sdpa_efficient" if backend in ("sdpa_flash", "flash_attn") else backend)
    empty = ~mask.any(-1)
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))


def merge_pair(a: tuple, b: tuple) -> tuple:
    """merge_partials of two (out [B, H, T, D], lse [B, H, T]) partials; on CUDA one fused kernel
    (model/merge_kernel.py)."""
    if merge_kernel.available(a[0], b[0]):
        return merge_kernel.merge_two(*a, *b)
    return merge_partials([a[0], b[0]], [a[1], b[1]])


def merge_partials(outs, lses):
    """Exact attention over the union of disjoint KV shards from each shard's (out, lse).

    outs: list of [..., D] (or one stacked [P, ..., D]); lses: list of [...] (or [P, ...]), float32.
    Shards with lse = -inf (no keys) weigh nothing. A fixed handful of kernels whatever P is.
    """
    out_stack = outs if torch.is_tensor(outs) else torch.stack(list(outs))
    lse_stack = (lses if torch.is_tensor(lses) else torch.stack(list(lses))).float()  # [P, ...]
    lse = torch.logsumexp(lse_stack, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lse_stack - safe)  # [P, ...]; exp(-inf) = 0 for empty shards
    out = (weights.unsqueeze(-1) * out_stack.float()).sum(0)
    return out.to(out_stack.dtype), lse
