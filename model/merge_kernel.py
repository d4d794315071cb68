"""The LSE merge of two attention partials on CUDA in one Triton kernel: each partial read once, the result
written once.

`model.attention.merge_partials` (the definition, and what runs elsewhere) stacks the partials and computes in
fp32 temporaries, about a fifth of the attention it merges for a prefill chunk's two halves. Same math: weights exp(lse_i - max),
the output rounded once to the partials' dtype; a row where both partials saw no key gets out = 0, lse = -inf.
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs use merge_partials
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_T = 32  # queries per program: a [32, head_dim] tile of each partial


def available(out_a: torch.Tensor, out_b: torch.Tensor) -> bool:
    d = out_a.shape[-1]
    return (triton is not None and out_a.is_cuda and out_a.shape == out_b.shape and out_a.dtype == out_b.dtype
            and out_a.stride(-1) == 1 and out_b.stride(-1) == 1 and d & (d - 1) == 0)


if triton is not None:
    @triton.jit
    def _merge_two(a_ptr, b_ptr, la_ptr, lb_ptr, out_ptr, lse_ptr, heads, tokens, sab, sah, sat, sbb, sbh, sbt,
                   sob, soh, sot, DIM: tl.constexpr, BLOCK: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)  # one (batch row, head); 64-bit offsets (a chunk spans > 2^31 elements)
        b, h = bh // heads, bh % heads
        t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = t < tokens
        la = tl.load(la_ptr + bh * tokens + t, mask=keep, other=float("-inf"))
        lb = tl.load(lb_ptr + bh * tokens + t, mask=keep, other=float("-inf"))
        m = tl.maximum(la, lb)
        m = tl.where(m == float("-inf"), 0.0, m)  # both empty: weights exp(-inf) = 0
        wa, wb = tl.exp(la - m), tl.exp(lb - m)
        total = wa + wb
        inv = tl.where(total > 0, 1.0 / total, 0.0)
        d = tl.arange(0, DIM)[None, :]
        rows = keep[:, None]
        oa = tl.load(a_ptr + b * sab + h * sah + t[:, None] * sat + d, mask=rows, other=0.0).to(tl.float32)
        ob = tl.load(b_ptr + b * sbb + h * sbh + t[:, None] * sbt + d, mask=rows, other=0.0).to(tl.float32)
        out = (oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * sob + h * soh + t[:, None] * sot + d, out, mask=rows)
        tl.store(lse_ptr + bh * tokens + t, tl.where(total > 0, m + tl.log(total), float("-inf")), mask=keep)


def merge_two(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """out_* [B, H, T, D] (any strides, D contiguous), lse_* [B, H, T] float32 -> (out [B, H, T, D] in out_a's
    dtype, lse [B, H, T] float32): attention over the union of the two partials' keys."""
    bsz, heads, tokens, dim = out_a.shape
    out = torch.empty(bsz, heads, tokens, dim, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(bsz, heads, tokens, dtype=torch.float32, device=out_a.device)
    if out.numel():
        grid = (bsz * heads, triton.cdiv(tokens, BLOCK_T))
        _merge_two[grid](out_a, out_b, lse_a.float().contiguous(), lse_b.float().contiguous(), out, lse, heads, tokens,
                         *out_a.stride()[:3], *out_b.stride()[:3], *out.stride()[:3], DIM=dim, BLOCK=BLOCK_T)
    return out, lse
