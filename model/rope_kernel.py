"""Rotary embedding on CUDA in one Triton kernel: read x once, write the rotated x once.

The torch form in model/transformer.py (the definition, and what runs elsewhere) takes several passes over
fp32 temporaries, a seventh of a long prefill on a GPU.
Same math: x and the fp32 cos/sin tables multiplied in fp32, rounded once to x's dtype.
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch form
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available(x: torch.Tensor) -> bool:
    half = x.shape[-1] // 2
    return triton is not None and x.is_cuda and x.stride(-1) == 1 and half > 0 and half & (half - 1) == 0


if triton is not None:
    @triton.jit
    def _rope(x_ptr, out_ptr, cos_ptr, sin_ptr, heads, tokens, sxb, sxh, sxt, sob, soh, sot,
              BLOCK_H: tl.constexpr, HALF: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one token (b, t): every head of it; 64-bit offsets (a prefill
        b, t = row // tokens, row % tokens  # chunk of 140 x 2048 tokens spans more than 2^31 elements)
        h = tl.arange(0, BLOCK_H)[:, None]
        i = tl.arange(0, HALF)[None, :]
        keep = h < heads
        src = x_ptr + b * sxb + t * sxt + h * sxh + i
        x1 = tl.load(src, mask=keep, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=keep, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + row * HALF + i)
        s = tl.load(sin_ptr + row * HALF + i)
        dst = out_ptr + b * sob + t * sot + h * soh + i
        tl.store(dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=keep)
        tl.store(dst + HALF, (x1 * s + x2 * c).to(out_ptr.dtype.element_ty), mask=keep)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] (any strides, D contiguous); cos, sin [B, T, D/2] fp32 -> rotated x, [B, H, T, D]."""
    b, heads, t, d = x.shape
    out = torch.empty(b, heads, t, d, dtype=x.dtype, device=x.device)
    if out.numel():
        _rope[(b * t,)](x, out, cos.contiguous(), sin.contiguous(), heads, t, x.stride(0), x.stride(1), x.stride(2),
                        out.stride(0), out.stride(1), out.stride(2), BLOCK_H=triton.next_power_of_2(heads), HALF=d // 2)
    return out
