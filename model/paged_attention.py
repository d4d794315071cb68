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
- on CUDA with Triton (an optional GPU dependency): a split-KV (flash-decoding) kernel, with two work plans.
  plan="splits" (the default): the grid is rows x heads x splits, one split count for the batch (choose_splits)
  and splits of the table's width, so that a small batch of long sequences still fills the GPU.
  plan="ragged" (RaggedPlan): each row is cut into work items of a bounded token count computed from the batch's
  total tokens, so that a long row among short ones is spread over as many programs as its length asks; the grid
  is a static max_items x heads and the item list is built on the device. Either way each program walks its
  tokens in tiles, gathering slots through the block table, with an online softmax, and a second kernel merges
  a row's partials by their LSE. No host synchronization: the launches depend only on shapes.
- on CUDA with cuDNN (backend="cudnn"; the optional `nvidia-cudnn-frontend` package, module `cudnn`): cuDNN's
  paged SDPA reads the same pool through a page table, one graph built per shape (CudnnPagedDecode). bf16/fp16 only
  (cuDNN has no fp32 SDPA): fp32 calls run Triton.
- elsewhere (and as the tests' reference): gather the blocks and run the math backend.
backend="auto" picks one of the two kernels by a rule on the call's inputs (choose_backend), never by timing.
"""
from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the reference path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# cuDNN's paged SDPA comes with the optional `nvidia-cudnn-frontend` package (the extra `cudnn` of pyproject.toml). It
# is imported on first use, not here: the import loads libcudnn, which CPU installs lack.
CUDNN_INSTALL = "pip install nvidia-cudnn-frontend==1.16.0"
CUDNN_DTYPES = (torch.bfloat16, torch.float16)  # cuDNN's SDPA has no fp32 kernel
BACKENDS = ("triton", "cudnn", "auto")

# Defaults from the sweeps of harness/bench_paged.py: 64-token tiles and 4 warps, where larger tiles read slower;
# splits give each SM at least 8 programs, so that a micro-batch of few rows x heads still fills the GPU.
TILE_TOKENS = 64  # tokens per inner iteration of the kernel: a [64, 128] bf16 tile of K and of V
WARPS = 4
STAGES = 2  # software pipelining of the tile loop's loads
MIN_SPLIT_TOKENS = 512  # a split shorter than this spends more on its partial than it saves
PROGRAMS_PER_SM = 8
# The ragged plan's programs per SM where a call does not bring its own plan: more than the split plan's, since
# chunks of mixed-length rows finish unevenly and more of them keep every SM busy to the end
RAGGED_PROGRAMS_PER_SM = 4 * PROGRAMS_PER_SM
# The plan for a serving step's decode rows, whose lengths differ from row to row: ragged. The split plan sizes its
# work by the table's width, so one long row among short ones runs on few programs; it stays for the static-batch
# engines, whose rows are uniform.
SERVING_PLAN = "ragged"
# The backend for the static-batch engines' decode rows: "auto", i.e. cuDNN's paged SDPA where choose_backend allows it.
STATIC_BATCH_BACKEND = "auto"
# GPUs (torch.cuda.get_device_name) on which the paged benchmark (harness/bench_paged.py) measured cuDNN's paged SDPA
# faster than the split plan on uniform batches at every block size; backend="auto" takes cuDNN only on these, and a
# GPU not measured takes Triton. Where cuDNN was measured slower, on uniform and ragged batches alike, it is absent.
CUDNN_FASTER_ON: frozenset = frozenset()
PLAN_TILE_ELEMENTS = 8192  # items x rows compared at once by the plan kernel: 64 values a thread at 4 warps


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
                 warps: int = WARPS, stages: int = STAGES, plan: "str | RaggedPlan" = "splits",
                 backend: str = "triton", build: bool = True):
    """(out, lse) of each row's query over its blocks; see the module docstring.
    backend picks the kernel: "triton" (Triton on CUDA, else the reference), "cudnn" (cuDNN's paged SDPA for bf16/fp16
    on CUDA; fp32 and non-CUDA tensors take the "triton" path; raises where `cudnn` cannot be imported), or "auto"
    (choose_backend: the rule on dtype, device and plan; where cuDNN cannot build a graph for these shapes and
    strides, Triton).
    plan picks the Triton kernel's work split: "splits" (each row cut into `splits` equal shares of the table's width;
    None = choose_splits) or "ragged" (each row cut into chunks of a bounded token count, RaggedPlan, its buffers
    allocated for this call), or a RaggedPlan whose buffers this call reuses (its tile then overrides `tile`).
    splits, tile, warps and stages tune the Triton kernel; they do not change the result. cuDNN ignores them.
    build=False: `plan` is a RaggedPlan already built for these kv_lens (pass_plan: an engine builds the work list
    once per pass and every layer of the pass reuses it)."""
    if not (isinstance(plan, RaggedPlan) or plan in ("splits", "ragged")):
        raise ValueError(f"plan={plan!r}: expected 'splits', 'ragged' or a RaggedPlan")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "cudnn" and cudnn_module() is None:
        raise RuntimeError(f"backend='cudnn': the cuDNN frontend cannot be imported ({cudnn_import_error()}); "
                           f"install it with `{CUDNN_INSTALL}` (or the project's extra: pip install '.[cudnn]'), "
                           "or use backend='triton'")
    use_cudnn = backend == "cudnn" and q.device.type == "cuda" and q.dtype in CUDNN_DTYPES
    if backend == "auto" and choose_backend(q.device, q.dtype, plan) == "cudnn":
        use_cudnn = CUDNN_PAGED.supports(q, k_blocks, v_blocks, block_table)
    if use_cudnn:
        return CUDNN_PAGED(q, k_blocks, v_blocks, block_table, kv_lens)
    if not triton_available(q.device):
        return paged_decode_reference(q, k_blocks, v_blocks, block_table, kv_lens)
    if plan == "splits":
        return _paged_decode_triton(q, k_blocks, v_blocks, block_table, kv_lens, splits, tile, warps, stages)
    return paged_decode_ragged(q, k_blocks, v_blocks, block_table, kv_lens, None if plan == "ragged" else plan,
                               tile=tile, warps=warps, stages=stages, build=build)


# How the serving engines build a decode pass's ragged plan, as their records name it (`serving.decode_plan_build`)
# and the performance model prices it: "pass_tiles", once a pass (pass_plan) by _plan_kernel's program per tile of
# items. Records of earlier engines: "pass" (once a pass, one program comparing the tiles in turn) and, without the
# field, "layer" (one program, in every layer of the pass).
PLAN_BUILD = "pass_tiles"
PLAN_BUILDS = ("layer", "pass", "pass_tiles")


def pass_plan(kv_lens, width: int, block: int, heads: int) -> "str | RaggedPlan":
    """The ragged work list for a pass's rows, built once for all the pass's layers (their lengths are the same in
    every layer; built per layer, the plan kernel's compare of every item against every row would run once a
    layer): a RaggedPlan built for kv_lens where the Triton kernel runs (and the serving plan is the ragged one),
    to be given to paged_decode with build=False; elsewhere SERVING_PLAN (the reference path takes no plan)."""
    if SERVING_PLAN != "ragged" or not triton_available(kv_lens.device):
        return SERVING_PLAN
    plan = RaggedPlan(len(kv_lens), width, block, heads, sm_count(kv_lens.device), kv_lens.device,
                      programs_per_sm=RAGGED_PROGRAMS_PER_SM)
    return plan.build(kv_lens)


def choose_backend(device, dtype, plan: "str | RaggedPlan" = "splits", cudnn_importable: bool | None = None,
                   device_name: str | None = None) -> str:
    """The rule behind backend="auto": "cudnn" for the split plan (the plan of static batches, whose rows share one
    length) in bf16/fp16 on a CUDA GPU listed in CUDNN_FASTER_ON where the cuDNN frontend imports; "triton"
    otherwise: the ragged plan (serving rows of differing lengths, which cuDNN's paged SDPA reads at a fraction of
    the bandwidth while the ragged plan spreads a long row over many programs), fp32 (no cuDNN kernel), no CUDA (the
    Triton path then runs the reference), a GPU not measured faster with cuDNN, no cuDNN.
    Depends on the inputs' dtype, device and plan only (paged_decode then takes Triton for a shape cuDNN builds no
    graph for, decided once per shape): the same call always takes the same kernel, so a captured step replays the
    kernel its eager warm-up ran. cudnn_importable: None asks cudnn_module(); device_name: None asks torch."""
    if torch.device(device).type != "cuda" or dtype not in CUDNN_DTYPES:
        return "triton"
    if isinstance(plan, RaggedPlan) or plan != "splits":
        return "triton"
    if device_name is None:
        device_name = torch.cuda.get_device_name(device)
    if device_name not in CUDNN_FASTER_ON:
        return "triton"
    if cudnn_importable is None:
        cudnn_importable = cudnn_module() is not None
    return "cudnn" if cudnn_importable else "triton"


def choose_splits(rows: int, heads: int, max_tokens: int, sm_count: int) -> int:
    """Splits of each row's tokens: the fewest that give every SM PROGRAMS_PER_SM programs (a small batch of long
    rows still fills the GPU with its tail short, a large batch needs no split), none shorter than
    MIN_SPLIT_TOKENS. A power of two, for the merge kernel."""
    most = 1 << (max(1, max_tokens // MIN_SPLIT_TOKENS).bit_length() - 1)
    splits = 1
    while splits < most and rows * heads * splits < PROGRAMS_PER_SM * sm_count:
        splits *= 2
    return splits


def ragged_plan_sizes(heads: int, sm_count: int, tile: int = TILE_TOKENS, programs_per_sm: int = PROGRAMS_PER_SM,
                      min_chunk: int = MIN_SPLIT_TOKENS) -> tuple[int, int]:
    """(target_items, min_chunk) of a RaggedPlan: the work items that give every SM programs_per_sm programs over the
    heads, and the shortest chunk, rounded up to the tile."""
    return max(1, -(-programs_per_sm * sm_count // heads)), -(-max(1, min_chunk) // tile) * tile


def ragged_chunk_tokens(total_tokens: int, target_items: int, min_chunk: int, tile: int = TILE_TOKENS) -> int:
    """The chunk RaggedPlan.build cuts rows into for a batch of total_tokens in all: the total over the target
    items, at least min_chunk, rounded up to the tile (build computes the same on the device)."""
    return -(-max(-(-total_tokens // target_items), min_chunk) // tile) * tile


def plan_kernel_shape(rows: int) -> tuple[int, int]:
    """(ROWS, ITEMS) of _plan_kernel for a plan of `rows` rows: the rows padded to a power of two, and the items it
    compares with every row at once (ITEMS x ROWS at most PLAN_TILE_ELEMENTS)."""
    rows_p2 = 1 << max(0, rows - 1).bit_length()
    return rows_p2, max(1, min(128, PLAN_TILE_ELEMENTS // rows_p2))


def plan_kernel_tiles(rows: int, max_items: int) -> int:
    """The tiles of items x rows of _plan_kernel for a plan of these sizes: its grid, one program a tile
    (harness/bench_paged.py --ragged times the build alone, plan_us)."""
    return -(-max_items // plan_kernel_shape(rows)[1])


class RaggedPlan:
    """The work list of the ragged kernel, in buffers allocated once per shape and refilled on the device.

    Each row is cut into work items of at most `chunk` tokens (a long row into many, a short row into one, an empty
    row into none); the kernel's grid is max_items x heads, and a merge program per (row, head) combines the row's
    items, which are contiguous: items offsets[row]..offsets[row+1]. build(kv_lens) computes the list on the
    device (one Triton kernel on CUDA, a program per tile of items; torch ops elsewhere; no host synchronization,
    no Python work per row), so an engine can capture build + kernels in a CUDA graph once and replay it after the
    block table and lengths change in place.

    chunk is computed on the device from the batch's total tokens: ceil(total / target_items), at least min_chunk,
    rounded up to the tile, where target_items = ceil(programs_per_sm x SMs / heads) gives every SM about
    programs_per_sm programs whatever the lengths. The item count is then bounded by shapes alone: a row of len
    tokens gives ceil(len / chunk) < len / chunk + 1 items, so the batch gives at most total / chunk + rows <=
    target_items + rows items; and each row at most ceil(width x block / min_chunk). max_items, the launched grid,
    is the smaller bound. (A chunk from the table's width instead would be the same for a 128K row among 1K rows as
    for a batch of 128K rows: the long row would get a few items.)

    Buffers (int32 on `device`): count [1] the items in use; chunk [1]; offsets [rows + 1]; item_row, item_start,
    item_end [max_items], the item's row and token range [start, end); items past count hold row -1 and an empty
    range. part_out [max_items, heads, dim] and part_lse [max_items, heads] (log2 domain) hold the partials, made on
    the first call that knows the head dim.
    """

    def __init__(self, rows: int, width: int, block: int, heads: int, sm_count: int, device,
                 tile: int = TILE_TOKENS, programs_per_sm: int = PROGRAMS_PER_SM, min_chunk: int = MIN_SPLIT_TOKENS):
        self.rows, self.width, self.block, self.heads, self.tile = rows, width, block, heads, tile
        self.device = torch.device(device)
        self.row_tokens = width * block  # no row holds more tokens than its table addresses
        self.target_items, self.min_chunk = ragged_plan_sizes(heads, sm_count, tile, programs_per_sm, min_chunk)
        per_row = -(-self.row_tokens // self.min_chunk)
        self.max_items = min(rows * per_row, rows + self.target_items)
        i32 = dict(dtype=torch.int32, device=self.device)
        self.count = torch.zeros(1, **i32)
        self.chunk = torch.zeros(1, **i32)
        self.offsets = torch.zeros(rows + 1, **i32)
        self.item_row = torch.full((self.max_items,), -1, **i32)
        self.item_start = torch.zeros(self.max_items, **i32)
        self.item_end = torch.zeros(self.max_items, **i32)
        self._items = torch.arange(self.max_items, dtype=torch.int64, device=self.device)
        self.part_out = self.part_lse = None

    def build(self, kv_lens, use_triton: bool | None = None) -> "RaggedPlan":
        """Fill the buffers in place for these lengths ([rows], on the plan's device). Lengths past the table's
        width x block count as width x block, as in paged_decode_reference. use_triton (None: where Triton runs
        on the device) writes them with one kernel (_plan_kernel, a program a tile of items) instead of some thirty
        small torch ops."""
        assert kv_lens.shape == (self.rows,), f"kv_lens {tuple(kv_lens.shape)} for a plan of {self.rows} rows"
        if use_triton is None:
            use_triton = triton_available(self.device)
        if use_triton and self.rows:
            rows_p2, items = plan_kernel_shape(self.rows)
            grid = (max(1, plan_kernel_tiles(self.rows, self.max_items)),)  # program 0 writes the count
            _plan_kernel[grid](kv_lens, self.count, self.chunk, self.offsets, self.item_row, self.item_start,
                               self.item_end, self.rows, self.row_tokens, self.target_items, self.min_chunk,
                               self.max_items, TILE=self.tile, ROWS=rows_p2, ITEMS=items, num_warps=4)
            return self
        lens = kv_lens.to(torch.int64).clamp(0, self.row_tokens)
        chunk = (lens.sum() + self.target_items - 1) // self.target_items
        chunk = (chunk.clamp(min=self.min_chunk) + self.tile - 1) // self.tile * self.tile
        counts = (lens + chunk - 1) // chunk
        ends = torch.cumsum(counts, 0)  # ends[r] = offsets[r + 1]
        total = ends[-1:] if self.rows else counts.new_zeros(1)
        row = torch.searchsorted(ends, self._items, right=True)  # the row whose items hold item i
        valid = self._items < total
        row = row.clamp(max=max(self.rows - 1, 0))
        start = (self._items - (ends[row] - counts[row])) * chunk
        end = torch.minimum(start + chunk, lens[row])
        self.count.copy_(total)
        self.chunk.copy_(chunk.view(1))
        self.offsets[1:].copy_(ends)
        self.item_row.copy_(torch.where(valid, row, -1))
        self.item_start.copy_(torch.where(valid, start, 0))
        self.item_end.copy_(torch.where(valid, end, 0))
        return self

    def partials(self, dim: int):
        """The partials' buffers for head dim `dim`, made once."""
        if self.part_out is None or self.part_out.shape[2] != dim:
            self.part_out = torch.empty(self.max_items, self.heads, dim, dtype=torch.float32, device=self.device)
            self.part_lse = torch.empty(self.max_items, self.heads, dtype=torch.float32, device=self.device)
        return self.part_out, self.part_lse


if triton is not None:

    @triton.jit
    def _attend(q_ptr, k_ptr, v_ptr, table_ptr, row, head, start, end, sq_n, sq_h, sk_slot, sk_h, sk_t,
                sv_slot, sv_h, sv_t, st_n, scale_log2e, BLOCK: tl.constexpr, DIM: tl.constexpr, TILE: tl.constexpr,
                STAGES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """The query of (row, head) over the row's tokens [start, end), tile by tile, with an online softmax:
        returns the partial out [DIM] (normalized) and its LSE (log2 domain; out 0 and -inf for no tokens). Both
        products run on tensor cores: the query is padded to 16 rows (row 0 real, the rest zero), so q k^T and
        p v are tl.dot; the tiles then stream through shared memory, which the loop's software pipelining
        overlaps with the math. UPCAST makes the dot operands fp32: set only under Triton's CPU interpreter,
        whose tl.dot multiplies bf16 operands' raw bits."""
        dims = tl.arange(0, DIM)
        qrow = tl.arange(0, 16)
        q = tl.load(q_ptr + row * sq_n + head * sq_h + qrow[:, None] * 0 + dims[None, :], mask=qrow[:, None] == 0,
                    other=0.0)  # [16, D], only row 0 non-zero
        if UPCAST:
            q = q.to(tl.float32)
        m = tl.full([16], float("-inf"), tl.float32)
        l = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, DIM], tl.float32)
        for t0 in tl.range(start, end, TILE, num_stages=STAGES):
            tok = t0 + tl.arange(0, TILE)
            valid = tok < end
            if BLOCK % TILE == 0:  # t0 is a multiple of TILE: the tile lies in one block
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
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e  # [16, TILE], log2 domain
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            pv = p.to(v.dtype)
            if UPCAST:
                pv = pv.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        first = qrow == 0
        acc0 = tl.sum(tl.where(first[:, None], acc, 0.0), axis=0)
        l0 = tl.sum(tl.where(first, l, 0.0), axis=0)
        m0 = tl.max(tl.where(first, m, float("-inf")), axis=0)
        empty = l0 == 0.0
        out = tl.where(empty, 0.0, acc0 / tl.where(empty, 1.0, l0))
        lse2 = tl.where(empty, float("-inf"), m0 + tl.log2(tl.where(empty, 1.0, l0)))
        return out, lse2

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, part_out_ptr, part_lse_ptr,
                          sq_n, sq_h, sk_slot, sk_h, sk_t, sv_slot, sv_h, sv_t, st_n, split_tokens, scale_log2e, splits,
                          HEADS: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr, TILE: tl.constexpr,
                          STAGES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """One program = one (row, head, split): its share of the row's tokens (_attend); the partial out and
        LSE (log2 domain) go to part_out / part_lse.
        (A CUDA-core version with tl.sum reductions read at 0.41-0.54 of the bandwidth: paged.md.)"""
        row, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kv_len = tl.load(lens_ptr + row)
        start = split * split_tokens
        end = tl.minimum(start + split_tokens, kv_len)
        out, lse2 = _attend(q_ptr, k_ptr, v_ptr, table_ptr, row, head, start, end, sq_n, sq_h, sk_slot, sk_h, sk_t,
                            sv_slot, sv_h, sv_t, st_n, scale_log2e, BLOCK, DIM, TILE, STAGES, PRECISION, UPCAST)
        base = (row * HEADS + head) * splits + split
        tl.store(part_out_ptr + base * DIM + tl.arange(0, DIM), out)
        tl.store(part_lse_ptr + base, lse2)

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


    @triton.jit
    def _plan_kernel(lens_ptr, count_ptr, chunk_ptr, offsets_ptr, item_row_ptr, item_start_ptr, item_end_ptr,
                     rows, row_tokens, target_items, min_chunk, max_items,
                     TILE: tl.constexpr, ROWS: tl.constexpr, ITEMS: tl.constexpr):
        """RaggedPlan.build, one program per tile of ITEMS items: every program computes the same chunk, counts and
        offsets from the lengths (program 0 stores them), then writes its tile's items; an item's row is the number
        of rows whose items end at or before it, found by comparing the items with every row's end (no gather from
        registers in Triton). The tiles run side by side, so the build does not grow with the tiles."""
        r = tl.arange(0, ROWS)
        in_batch = r < rows
        lens = tl.load(lens_ptr + r, mask=in_batch, other=0).to(tl.int64)
        lens = tl.minimum(tl.maximum(lens, 0), row_tokens)
        chunk = (tl.sum(lens, axis=0) + target_items - 1) // target_items
        chunk = (tl.maximum(chunk, min_chunk) + TILE - 1) // TILE * TILE
        counts = (lens + chunk - 1) // chunk
        ends = tl.cumsum(counts, axis=0)  # rows past the batch: the count in use, past every item in use
        starts = ends - counts
        total = tl.sum(counts, axis=0)
        if tl.program_id(0) == 0:
            tl.store(count_ptr, total.to(tl.int32))
            tl.store(chunk_ptr, chunk.to(tl.int32))
            tl.store(offsets_ptr, 0)
            tl.store(offsets_ptr + 1 + r, ends.to(tl.int32), mask=in_batch)
        i = tl.program_id(0) * ITEMS + tl.arange(0, ITEMS)
        row = tl.sum((ends[None, :] <= i[:, None]).to(tl.int32), axis=1)
        valid = i < total
        mine = r[None, :] == row[:, None]  # [ITEMS, ROWS]: one True for an item in use
        start = (i - tl.sum(tl.where(mine, starts[None, :], 0), axis=1)) * chunk
        end = tl.minimum(start + chunk, tl.sum(tl.where(mine, lens[None, :], 0), axis=1))
        inside = i < max_items
        tl.store(item_row_ptr + i, tl.where(valid, row, -1), mask=inside)
        tl.store(item_start_ptr + i, tl.where(valid, start, 0).to(tl.int32), mask=inside)
        tl.store(item_end_ptr + i, tl.where(valid, end, 0).to(tl.int32), mask=inside)

    @triton.jit
    def _ragged_kernel(q_ptr, k_ptr, v_ptr, table_ptr, item_row_ptr, item_start_ptr, item_end_ptr, count_ptr,
                       part_out_ptr, part_lse_ptr, sq_n, sq_h, sk_slot, sk_h, sk_t, sv_slot, sv_h, sv_t, st_n,
                       scale_log2e, HEADS: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr, TILE: tl.constexpr,
                       STAGES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """One program = one (work item, head) of a RaggedPlan: the item's tokens [start, end) of its row
        (_attend); the partial goes to the item's slot of part_out / part_lse. The grid holds the plan's static
        max_items; programs past the item count the plan wrote on the device return at once."""
        item, head = tl.program_id(0), tl.program_id(1)
        if item >= tl.load(count_ptr):
            return
        row = tl.load(item_row_ptr + item)
        start = tl.load(item_start_ptr + item)
        end = tl.load(item_end_ptr + item)
        out, lse2 = _attend(q_ptr, k_ptr, v_ptr, table_ptr, row, head, start, end, sq_n, sq_h, sk_slot, sk_h, sk_t,
                            sv_slot, sv_h, sv_t, st_n, scale_log2e, BLOCK, DIM, TILE, STAGES, PRECISION, UPCAST)
        base = item * HEADS + head  # partials are small: int32 offsets
        tl.store(part_out_ptr + base * DIM + tl.arange(0, DIM), out)
        tl.store(part_lse_ptr + base, lse2)

    @triton.jit
    def _ragged_merge_kernel(part_out_ptr, part_lse_ptr, offsets_ptr, out_ptr, lse_ptr,
                             HEADS: tl.constexpr, DIM: tl.constexpr):
        """One program = one (row, head): the row's items offsets[row]..offsets[row+1] (contiguous) merged by
        their LSE with a running maximum; a row with no item (no tokens) gets out 0 and lse -inf."""
        row, head = tl.program_id(0), tl.program_id(1)
        lo = tl.load(offsets_ptr + row)
        hi = tl.load(offsets_ptr + row + 1)
        dims = tl.arange(0, DIM)
        m = float("-inf")
        total = 0.0
        acc = tl.zeros([DIM], tl.float32)
        for item in range(lo, hi):
            base = item * HEADS + head
            lse2 = tl.load(part_lse_ptr + base)  # log2 domain; finite: an item holds at least one token
            m_new = tl.maximum(m, lse2)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse2 - m_new)
            acc = acc * alpha + w * tl.load(part_out_ptr + base * DIM + dims)
            total = total * alpha + w
            m = m_new
        empty = total == 0.0
        tl.store(out_ptr + (row * HEADS + head) * DIM + dims, tl.where(empty, 0.0, acc / tl.where(empty, 1.0, total)))
        ln2 = 0.6931471805599453
        tl.store(lse_ptr + row * HEADS + head, tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, total))) * ln2))


def _precision(q) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 caches keep fp32 products: exact fp32 runs


def _upcast(q) -> bool:
    """Off the GPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1), whose tl.dot multiplies
    bf16 operands' raw bits: there the kernels make their dot operands fp32."""
    return q.device.type != "cuda"


def sm_count(device) -> int:
    """Streaming multiprocessors of `device` (1 off CUDA): what the kernels size their grids by."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


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
        splits = choose_splits(n, heads, max_tokens, sm_count(q.device))
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
    _split_kernel[(n, heads, splits)](*args, PRECISION=_precision(q), UPCAST=_upcast(q), **meta)
    _merge_kernel[(n, heads)](part_out, part_lse, out, lse, HEADS=heads, SPLITS=splits, DIM=dim, num_warps=1)
    return out, lse


def paged_decode_ragged(q, k_blocks, v_blocks, block_table, kv_lens, plan: RaggedPlan | None = None,
                        tile: int = TILE_TOKENS, warps: int = WARPS, stages: int = STAGES, build: bool = True):
    """The Triton kernels over a ragged work plan: plan.build(kv_lens), the items' partials, the per-row merge.
    plan None: one allocated for these shapes (with `tile`); else the plan's buffers are reused (the call then
    allocates only out and lse), and its shapes must match; build=False: the plan already holds kv_lens's work
    list. Needs Triton: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    n, heads, dim = q.shape
    bs, width = k_blocks.shape[2], block_table.shape[1]
    if plan is None:
        plan = RaggedPlan(n, width, bs, heads, sm_count(q.device), q.device, tile=tile,
                          programs_per_sm=RAGGED_PROGRAMS_PER_SM)
    assert (plan.rows, plan.width, plan.block, plan.heads) == (n, width, bs, heads), "plan made for other shapes"
    out = torch.empty(n, heads, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, heads, dtype=torch.float32, device=q.device)
    if n == 0 or plan.max_items == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    assert q.stride(2) == 1 and k_blocks.stride(3) == 1 and v_blocks.stride(3) == 1, "head dim must be contiguous"
    if build:
        plan.build(kv_lens)
    part_out, part_lse = plan.partials(dim)
    _ragged_kernel[(plan.max_items, heads)](
        q, k_blocks, v_blocks, block_table, plan.item_row, plan.item_start, plan.item_end, plan.count, part_out,
        part_lse, q.stride(0), q.stride(1), k_blocks.stride(0), k_blocks.stride(1), k_blocks.stride(2),
        v_blocks.stride(0), v_blocks.stride(1), v_blocks.stride(2), block_table.stride(0),
        math.log2(math.e) / math.sqrt(dim), HEADS=heads, BLOCK=bs, DIM=dim, TILE=plan.tile, STAGES=stages,
        PRECISION=_precision(q), UPCAST=_upcast(q), num_warps=warps)
    _ragged_merge_kernel[(n, heads)](part_out, part_lse, plan.offsets, out, lse, HEADS=heads, DIM=dim, num_warps=1)
    return out, lse


# --- cuDNN's paged SDPA ---------------------------------------------------------------------------------------------

_cudnn_import = {}  # "module" or "error", filled by the first cudnn_module() call


def cudnn_module():
    """The cuDNN frontend's module `cudnn`, or None where it cannot be imported (not installed, or no libcudnn: the
    import error is kept for cudnn_import_error). Imported once, on first use."""
    if not _cudnn_import:
        try:
            import cudnn
            _cudnn_import["module"] = cudnn
        except Exception as e:  # ImportError, or OSError where libcudnn does not load
            _cudnn_import["error"] = f"{type(e).__name__}: {e}"
    return _cudnn_import.get("module")


def cudnn_import_error() -> str | None:
    cudnn_module()
    return _cudnn_import.get("error")


def cudnn_available(device) -> bool:
    return torch.device(device).type == "cuda" and cudnn_module() is not None


class CudnnGraphUnsupported(RuntimeError):
    """cuDNN built no execution plan for a paged decode of these shapes, strides and dtype."""


class _PagedGraph:
    """One built cuDNN paged-SDPA graph and what its executions reuse: the graph's tensors, a workspace and the query
    lengths (all 1). Any failure to describe or build it raises CudnnGraphUnsupported with cuDNN's message."""

    def __init__(self, cudnn, handle, q, k_blocks, v_blocks, block_table):
        try:
            self._build(cudnn, handle, q, k_blocks, v_blocks, block_table)
        except Exception as e:  # cudnnGraphNotSupportedError, a cuDNN error raised as RuntimeError, an API mismatch
            raise CudnnGraphUnsupported(f"{type(e).__name__}: {e}") from e
        self.handle = handle
        self.workspace = torch.empty(max(1, self.graph.get_workspace_size()), dtype=torch.uint8, device=q.device)
        self.ones = torch.ones(q.shape[0], 1, 1, 1, dtype=torch.int32, device=q.device)

    def _build(self, cudnn, handle, q, k_blocks, v_blocks, block_table):
        n, heads, dim = q.shape
        width, block = block_table.shape[1], k_blocks.shape[2]
        io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[q.dtype]
        i32, f32 = cudnn.data_type.INT32, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        # q [n, H, D] as cuDNN's [n, H, s_q = 1, D]: the sequence stride of a length-1 axis is never stepped
        self.q = g.tensor(name="q", dim=[n, heads, 1, dim], stride=[q.stride(0), q.stride(1), q.stride(0), 1],
                          data_type=io)
        # the pool's blocks as they are: cuDNN's containers are [slots, H, block, D] with any strides
        self.k = g.tensor(name="k_blocks", dim=list(k_blocks.shape), stride=list(k_blocks.stride()), data_type=io)
        self.v = g.tensor(name="v_blocks", dim=list(v_blocks.shape), stride=list(v_blocks.stride()), data_type=io)
        table = dict(dim=[n, 1, width, 1], stride=[width, width, 1, 1], data_type=i32)
        self.k_table = g.tensor(name="k_table", **table)
        self.v_table = g.tensor(name="v_table", **table)
        lens = dict(dim=[n, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
        self.len_q = g.tensor(name="seq_len_q", **lens)
        self.len_kv = g.tensor(name="seq_len_kv", **lens)
        self.o, self.stats = g.sdpa(
            name="paged_decode", q=self.q, k=self.k, v=self.v, attn_scale=1.0 / math.sqrt(dim), generate_stats=True,
            use_padding_mask=True, seq_len_q=self.len_q, seq_len_kv=self.len_kv, paged_attention_k_table=self.k_table,
            paged_attention_v_table=self.v_table, paged_attention_max_seq_len_kv=width * block)
        # out written as [n, H, D] (row-major), stats as [n, H]
        self.o.set_output(True).set_dim([n, heads, 1, dim]).set_stride([heads * dim, dim, heads * dim, 1])
        self.o.set_data_type(io)
        self.stats.set_output(True).set_dim([n, heads, 1, 1]).set_stride([heads, 1, heads, 1]).set_data_type(f32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g


class CudnnPagedDecode:
    """paged_decode through cuDNN's paged SDPA, with the same contract: out [n, H, D] fp32 (cuDNN writes it in the
    inputs' dtype; converted), lse [n, H] fp32, natural log, scale included (cuDNN's softmax stats are exactly that:
    max + log(sum exp) of the scaled scores), out 0 and lse -inf for a row with kv_len 0.

    A graph is built once per key (device, dtype, rows, heads, head dim, table width, the pool's shapes and strides,
    the query's strides: the block size is the pools' dim 2) and kept; each call then clamps the table and lengths and
    executes the graph with a preallocated workspace on the current torch stream (the cuDNN handle's stream is set to
    it on every call). Nothing reads a tensor on the host, and what a call allocates (the clamped table and lengths,
    out, stats) comes from the capture's pool when captured, so a torch CUDA graph capture of a step records cuDNN's
    kernels (stream capture) with fixed pointers, and a replay after the block table, lengths and query changed in
    place reads the new values. The first call of a key builds the graph (host work, a workspace and a
    device allocation): make it outside any capture, as the engines' eager warm-up step does; a capture that meets an
    unbuilt key raises.

    What cuDNN is not given: a row with kv_len 0 runs as a row of length 1 (reading the first slot its table entry
    names, clamped into the pool) and its out and lse are set afterwards; lengths past the table's width x block count
    as width x block (as in paged_decode_reference); table entries are clamped into [0, slots), so an entry past a
    row's blocks that holds anything cannot send a read outside the pool (cuDNN may load a whole tile of table entries
    whatever the length)."""

    def __init__(self):
        self.graphs: dict[tuple, _PagedGraph] = {}
        self.unsupported: dict[tuple, str] = {}  # key -> why cuDNN built no plan
        self.handles: dict[int, object] = {}

    @staticmethod
    def key(q, k_blocks, v_blocks, block_table) -> tuple:
        return (q.device.index, q.dtype, tuple(q.shape), q.stride(0), q.stride(1), block_table.shape[1],
                tuple(k_blocks.shape), tuple(k_blocks.stride()), tuple(v_blocks.shape), tuple(v_blocks.stride()))

    def _handle(self, cudnn, device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.handles:
            with torch.cuda.device(index):
                self.handles[index] = cudnn.create_handle()
        return self.handles[index]

    def _graph(self, q, k_blocks, v_blocks, block_table) -> _PagedGraph:
        key = self.key(q, k_blocks, v_blocks, block_table)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph
        if key in self.unsupported:
            raise CudnnGraphUnsupported(self.unsupported[key])
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("paged_decode(backend='cudnn'): the first call of these shapes is being captured; run "
                               "one call outside the capture first (it builds cuDNN's graph)")
        cudnn = cudnn_module()
        assert cudnn is not None, CUDNN_INSTALL
        with torch.cuda.device(q.device):
            try:
                graph = _PagedGraph(cudnn, self._handle(cudnn, q.device), q, k_blocks, v_blocks, block_table)
            except CudnnGraphUnsupported as e:
                self.unsupported[key] = str(e)
                raise
        self.graphs[key] = graph
        return graph

    def supports(self, q, k_blocks, v_blocks, block_table) -> bool:
        """Whether cuDNN builds a graph for this call's shapes (building it, the first time, outside a capture)."""
        if q.stride(2) != 1 or k_blocks.stride(3) != 1 or v_blocks.stride(3) != 1:
            return False
        key = self.key(q, k_blocks, v_blocks, block_table)
        if key in self.graphs:
            return True
        if key in self.unsupported or torch.cuda.is_current_stream_capturing():
            return False
        try:
            self._graph(q, k_blocks, v_blocks, block_table)
        except CudnnGraphUnsupported:
            return False
        return True

    def __call__(self, q, k_blocks, v_blocks, block_table, kv_lens):
        n, heads, dim = q.shape
        if n == 0 or block_table.shape[1] == 0:
            return (q.new_zeros(n, heads, dim, dtype=torch.float32),
                    q.new_full((n, heads), float("-inf"), dtype=torch.float32))
        assert q.stride(2) == 1 and k_blocks.stride(3) == 1 and v_blocks.stride(3) == 1, "head dim must be contiguous"
        g = self._graph(q, k_blocks, v_blocks, block_table)
        width, block, slots = block_table.shape[1], k_blocks.shape[2], k_blocks.shape[0]
        table = block_table.clamp(0, slots - 1).to(torch.int32).contiguous()  # a fresh [n, width]: strides (width, 1)
        lens = kv_lens.clamp(1, width * block).to(torch.int32).view(n, 1, 1, 1).contiguous()
        out = torch.empty(n, heads, dim, dtype=q.dtype, device=q.device)
        stats = torch.empty(n, heads, dtype=torch.float32, device=q.device)
        cudnn = cudnn_module()
        cudnn.set_stream(handle=g.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        g.graph.execute({g.q: q, g.k: k_blocks, g.v: v_blocks, g.k_table: table, g.v_table: table, g.len_q: g.ones,
                         g.len_kv: lens, g.o: out, g.stats: stats}, g.workspace, handle=g.handle)
        empty = (kv_lens <= 0)[:, None]
        return (out.float().masked_fill_(empty[..., None], 0.0), stats.masked_fill_(empty, float("-inf")))


CUDNN_PAGED = CudnnPagedDecode()  # the process's built graphs, shared by every caller
