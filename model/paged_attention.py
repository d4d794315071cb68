"""Paged decode attention: one query per sequence against KV held in fixed-size blocks, returning (out, lse).

The layout is vLLM's. A rank's KV lives in one preallocated tensor of blocks; a sequence is a list of slots.
    q:           [n, H, D]                one new token per row
    k_blocks:    [slots, H, block, D]     any strides (a layer's view of the rank's one KV pool)
    v_blocks:    [slots, H, block, D]
    block_table: [n, max_blocks] int32    slot of the row's j-th block; entries past the row's blocks are ignored
    kv_lens:     [n] int32                valid tokens of the row; token t sits in block t // block at offset t % block
Returns out [n, H, D] float32 and lse [n, H] float32 (natural log, scale included), the contract of
model/attention.py, so that `merge_partials` combines the partials of several ranks unchanged. A row with
kv_len 0 (this rank holds none of the sequence) gets out = 0 and lse = -inf.

Two implementations of one API:
- on CUDA with Triton (an optional GPU dependency): a split-KV (flash-decoding) kernel. The grid is
  rows x heads x splits, so that a small batch of long sequences still fills the GPU; each program walks its
  share of the row's tokens in tiles, gathering slots through the block table, with an online softmax; a
  second kernel merges the splits by their LSE. No host synchronization: the launch depends only on shapes.
- elsewhere (and as the tests' reference): gather the blocks and run the math backend.
"""
from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the reference path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Defaults from the sweeps of harness/bench_paged.py: 64-token tiles and 4 warps, where larger tiles read slower;
# splits give each SM at least 8 programs, so that a micro-batch of few rows x heads still fills the GPU.
TILE_TOKENS = 64  # tokens per inner iteration of the kernel: a [64, 128] bf16 tile of K and of V
WARPS = 4
STAGES = 2  # software pipelining of the tile loop's loads
MIN_SPLIT_TOKENS = 512  # a split shorter than this spends more on its partial than it saves
PROGRAMS_PER_SM = 8


def paged_decode_reference(q, k_blocks, v_blocks, block_table, kv_lens):
    """Gather + math: the definition the kernel is tested against. Runs anywhere."""
    n, heads, dim = q.shape
    bs = k_blocks.shape[2]
    width = block_table.shape[1]
    if n == 0 or width == 0:
        return q.new_zeros(n, heads, dim, dtype=torch.float32), q.new_full((n, heads), float("-inf"), dtype=torch.float32)
    pos = torch.arange(width * bs, device=q.device)
    visible = pos[None, :] < kv_lens.long()[:, None]  # [n, T]
    slots = block_table.long().clamp(0, k_blocks.shape[0] - 1)  # unused entries may hold anything
    # gathered into [n, H, T, D] fp32 by one copy each, the same ops whatever the number of blocks
    k = q.new_empty(n, heads, width * bs, dim, dtype=torch.float32)
    v = torch.empty_like(k)
    k.view(n, heads, width, bs, dim).copy_(k_blocks[slots].transpose(1, 2))
    v.view(n, heads, width, bs, dim).copy_(v_blocks[slots].transpose(1, 2))
    scores = torch.einsum("nhd,nhtd->nht", q.float(), k) / math.sqrt(dim)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [n, H]; -inf for an empty row
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]), nan=0.0)
    return torch.einsum("nht,nhtd->nhd", probs, v), lse


def triton_available(device) -> bool:
    return triton is not None and torch.device(device).type == "cuda"


def paged_decode(q, k_blocks, v_blocks, block_table, kv_lens, splits: int | None = None, tile: int = TILE_TOKENS,
                 warps: int = WARPS, stages: int = STAGES):
    """(out, lse) of each row's query over its blocks; see the module docstring. Triton on CUDA, else the reference.
    splits (None = chosen from the shapes), tile and warps tune the kernel; they do not change the result."""
    if not triton_available(q.device):
        return paged_decode_reference(q, k_blocks, v_blocks, block_table, kv_lens)
    return _paged_decode_triton(q, k_blocks, v_blocks, block_table, kv_lens, splits, tile, warps, stages)


def choose_splits(rows: int, heads: int, max_tokens: int, sm_count: int) -> int:
    """Splits of each row's tokens: the fewest that give every SM PROGRAMS_PER_SM programs (a small batch of long
    rows still fills the GPU with its tail short, a large batch needs no split), none shorter than
    MIN_SPLIT_TOKENS. A power of two, for the merge kernel."""
    most = 1 << (max(1, max_tokens // MIN_SPLIT_TOKENS).bit_length() - 1)
    splits = 1
    while splits < most and rows * heads * splits < PROGRAMS_PER_SM * sm_count:
        splits *= 2
    return splits


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, part_out_ptr, part_lse_ptr,
                          sq_n, sq_h, sk_slot, sk_h, sk_t, sv_slot, sv_h, sv_t, st_n, split_tokens, scale_log2e, splits,
                          HEADS: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr, TILE: tl.constexpr,
                          STAGES: tl.constexpr, PRECISION: tl.constexpr):
        """One program = one (row, head, split): its share of the row's tokens, tile by tile, with an online
        softmax; the partial out and LSE (log2 domain) go to part_out / part_lse. Both products run on tensor
        cores: the query is padded to 16 rows (row 0 real, the rest zero), so q k^T and p v are tl.dot; the
        tiles then stream through shared memory, which the loop's software pipelining overlaps with the math.
        (A CUDA-core version with tl.sum reductions read at 0.41-0.54 of the bandwidth: paged.md.)"""
        row, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kv_len = tl.load(lens_ptr + row)
        start = split * split_tokens
        end = tl.minimum(start + split_tokens, kv_len)
        dims = tl.arange(0, DIM)
        qrow = tl.arange(0, 16)
        q = tl.load(q_ptr + row * sq_n + head * sq_h + qrow[:, None] * 0 + dims[None, :], mask=qrow[:, None] == 0,
                    other=0.0)  # [16, D], only row 0 non-zero
        m = tl.full([16], float("-inf"), tl.float32)
        l = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, DIM], tl.float32)
        for t0 in tl.range(start, end, TILE, num_stages=STAGES):
            tok = t0 + tl.arange(0, TILE)
            valid = tok < end
            if BLOCK % TILE == 0:
                slot = tl.load(table_ptr + row * st_n + t0 // BLOCK).to(tl.int64)
                off = (t0 % BLOCK + tl.arange(0, TILE)).to(tl.int64)
                k_rows = k_ptr + slot * sk_slot + head * sk_h + off[:, None] * sk_t
                v_rows = v_ptr + slot * sv_slot + head * sv_h + off[:, None] * sv_t
            else:
                slot = tl.load(table_ptr + row * st_n + tok // BLOCK, mask=valid, other=0).to(tl.int64)
                off = (tok % BLOCK).to(tl.int64)
                k_rows = k_ptr + slot[:, None] * sk_slot + head * sk_h + off[:, None] * sk_t
                v_rows = v_ptr + slot[:, None] * sv_slot + head * sv_h + off[:, None] * sv_t
            k = tl.load(k_rows + dims[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_rows + dims[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e  # [16, TILE], log2 domain
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        first = qrow == 0
        acc0 = tl.sum(tl.where(first[:, None], acc, 0.0), axis=0)
        l0 = tl.sum(tl.where(first, l, 0.0), axis=0)
        m0 = tl.max(tl.where(first, m, float("-inf")), axis=0)
        base = (row * HEADS + head) * splits + split
        empty = l0 == 0.0
        tl.store(part_out_ptr + base * DIM + dims, tl.where(empty, 0.0, acc0 / tl.where(empty, 1.0, l0)))
        tl.store(part_lse_ptr + base, tl.where(empty, float("-inf"), m0 + tl.log2(tl.where(empty, 1.0, l0))))

    @triton.jit
    def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
                      HEADS: tl.constexpr, SPLITS: tl.constexpr, DIM: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        base = (row * HEADS + head) * SPLITS
        splits = tl.arange(0, SPLITS)
        dims = tl.arange(0, DIM)
        lse2 = tl.load(part_lse_ptr + base + splits)  # log2 domain
        m = tl.max(lse2, axis=0)
        empty = m == float("-inf")
        w = tl.exp2(lse2 - tl.where(empty, 0.0, m))  # 0 for empty splits
        total = tl.sum(w, axis=0)
        parts = tl.load(part_out_ptr + (base + splits)[:, None] * DIM + dims[None, :])
        out = tl.sum(parts * w[:, None], axis=0) / tl.where(empty, 1.0, total)
        tl.store(out_ptr + (row * HEADS + head) * DIM + dims, tl.where(empty, 0.0, out))
        ln2 = 0.6931471805599453
        tl.store(lse_ptr + row * HEADS + head, tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, total))) * ln2))


def _paged_decode_triton(q, k_blocks, v_blocks, block_table, kv_lens, splits, tile=TILE_TOKENS, warps=WARPS,
                         stages=STAGES):
    n, heads, dim = q.shape
    out = torch.empty(n, heads, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, heads, dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    bs = k_blocks.shape[2]
    max_tokens = block_table.shape[1] * bs
    if splits is None:
        splits = choose_splits(n, heads, max_tokens, torch.cuda.get_device_properties(q.device).multi_processor_count)
    split_tokens = -(-max_tokens // splits)
    split_tokens = -(-split_tokens // tile) * tile
    part_out = torch.empty(n, heads, splits, dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(n, heads, splits, dtype=torch.float32, device=q.device)
    assert q.stride(2) == 1 and k_blocks.stride(3) == 1 and v_blocks.stride(3) == 1, "head dim must be contiguous"
    args = (q, k_blocks, v_blocks, block_table, kv_lens, part_out, part_lse,
            q.stride(0), q.stride(1), k_blocks.stride(0), k_blocks.stride(1), k_blocks.stride(2),
            v_blocks.stride(0), v_blocks.stride(1), v_blocks.stride(2), block_table.stride(0), split_tokens,
            math.log2(math.e) / math.sqrt(dim), splits)
    meta = dict(HEADS=heads, BLOCK=bs, DIM=dim, TILE=tile, STAGES=stages, num_warps=warps)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 caches keep fp32 products: exact fp32 runs
    _split_kernel[(n, heads, splits)](*args, PRECISION=precision, **meta)
    _merge_kernel[(n, heads)](part_out, part_lse, out, lse, HEADS=heads, SPLITS=splits, DIM=dim, num_warps=1)
    return out, lse
