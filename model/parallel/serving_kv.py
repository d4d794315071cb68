"""KV of a changing batch (serving mode): one pool of blocks per rank and a block table per batch slot.

Requests join and leave between steps; the scheduler (harness/serving/scheduler.py) owns which blocks a
request holds and sends only the table entries it allocated, so the engine updates its static table in
place (one indexed write per step) and never reallocates:
    blocks: model/parallel/paged_kv.PagedKV with `kv_blocks + 1` slots; the last one is a sink that takes the
            writes of padded positions (a step's rows are padded to its longest chunk), never read
    table:  [slots, max_blocks] int32, slot s's j-th block; entries past a row's blocks point at the sink
A step's rows are batch slots (a device tensor), each with the position its new tokens start at and their
count. Decode reads through the table with the paged kernel; a prefill chunk gathers the row's earlier keys
through it and attends with a per-row causal offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.attention import attention
from model.paged_attention import pass_plan, paged_decode
from model.parallel.paged_kv import PagedKV


@dataclass
class ServingPass:
    """One forward pass of a serving step on the device: rows are batch slots."""

    slots: torch.Tensor  # [b] long
    start: torch.Tensor  # [b] long: tokens of the row already in the KV
    lens: torch.Tensor  # [b] long: new tokens of the row (1 for decode)
    prefill: bool  # said by the host: a chunk of a prompt (padded to `width` tokens) or one decode token
    width: int  # new tokens per row, padded: the longest chunk (1 for decode)
    upto: int  # the host's max(start + lens): the keys the pass's rows span
    pooled: torch.Tensor | None = None  # FA Pool: [b] bool, the row's KV is in the pool
    pool_rows: torch.Tensor | None = None  # FA Pool: [n] long, the pooled rows' indices in the pass
    pool_ranks: tuple = ()  # FA Pool (host): the world ranks of the pool that hold blocks of the pooled rows
    pool_blocks: tuple = ()  # FA Pool (host): per rank in pool_ranks, the most blocks one pooled row holds there
    pool_writes: tuple = ()  # FA Pool (host): the ranks of pool_ranks that store a new token of the pooled rows
    host_start: tuple = ()  # a prefill pass (host): each row's start and new tokens, as the plan said
    host_lens: tuple = ()
    host_pooled: tuple = ()  # a prefill pass, FA Pool (host): whether each row's KV is in the pool
    one_mask: bool = False  # a prefill pass of a bucket graph: through one mask at any row count (no host values)

    def sub(self, index: torch.Tensor) -> "ServingPass":
        """The pass restricted to rows `index`."""
        return ServingPass(self.slots[index], self.start[index], self.lens[index], self.prefill, self.width, self.upto)


class ServingKV:
    """`kv_blocks` blocks of ids [first_id, first_id + kv_blocks) (other ids are other ranks': FA Pool), stored at
    id - first_id, and the sink after them."""

    def __init__(self, layers: int, slots: int, kv_blocks: int, heads: int, block_size: int, head_dim: int,
                 max_blocks: int, dtype, device, first_id: int = 0):
        self.store = PagedKV(layers, kv_blocks + 1, heads, block_size, head_dim, dtype, device)
        self.sink, self.block_size, self.max_blocks = kv_blocks, block_size, max_blocks
        self.first_id, self.kv_blocks = first_id, kv_blocks
        self.table = torch.full((slots, max_blocks), kv_blocks, dtype=torch.int32, device=device)
        self.current = None  # the pass the attention cores serve now (ServingPass)

    @property
    def current(self) -> ServingPass | None:
        return self._current

    @current.setter
    def current(self, p: ServingPass | None) -> None:
        self._current, self._of_pass = p, {}  # a new pass: nothing computed for the last one holds

    def of_pass(self, p: ServingPass, key: str, make):
        """make()'s value for pass p, computed by the first layer of the current pass that asks and reused by its
        other layers: what depends on the pass's rows and lengths but not on the layer (the rows' local table, the
        paged kernel's work list), so its kernels run once per pass, not once per layer. A pass other than the
        current one gets make() itself."""
        if p is not self._current:
            return make()
        if key not in self._of_pass:
            self._of_pass[key] = make()
        return self._of_pass[key]

    def pass_table(self, p: ServingPass) -> torch.Tensor:
        """local_table of the pass's rows, once per pass."""
        return self.of_pass(p, "table", lambda: self.local_table(p.slots))

    def decode_plan(self, p: ServingPass, kv_lens_of, heads: int):
        """(kv_lens, plan) of a decode pass over pass_table(p), once per pass: kv_lens_of(p) gives the rows' lengths
        in this rank's store, the plan is pass_plan's for them (paged_decode with build=False)."""
        def make():
            lens = kv_lens_of(p).to(torch.int32)
            return lens, pass_plan(lens, self.max_blocks, self.block_size, heads)
        return self.of_pass(p, "decode", make)

    def nbytes(self) -> int:
        return self.store.nbytes()

    def local_table(self, slots: torch.Tensor) -> torch.Tensor:
        """[b, max_blocks] int32 storage slots of the rows' blocks: this rank's at their place, others' at the sink."""
        table = self.table[slots]
        owned = (table >= self.first_id) & (table < self.first_id + self.kv_blocks)
        return torch.where(owned, table - self.first_id, self.sink)

    def update_table(self, updates: torch.Tensor) -> None:
        """updates [U, 3] (slot, block index, block id), in place (the same op for any U)."""
        self.table.index_put_((updates[:, 0], updates[:, 1]), updates[:, 2].to(torch.int32))

    def write(self, layer: int, p: ServingPass, k: torch.Tensor, v: torch.Tensor, shard: int = 0, shards: int = 1) -> None:
        """k, v [b, heads, t, head_dim] to their rows' positions [start, start + t); padded positions, and positions
        another KV shard holds, to the sink. With shards > 1 (model/parallel/dcp.py) position pos is in global
        block g = pos // block, held by shard g % shards as its local block g // shards."""
        b, heads, t, dim = k.shape
        pos = p.start[:, None] + torch.arange(t, device=k.device)  # [b, t]
        valid = torch.arange(t, device=k.device)[None, :] < p.lens[:, None]
        block = pos // self.block_size
        if shards > 1:
            valid = valid & (block % shards == shard)
            block = block // shards
        index = block.clamp(max=self.max_blocks - 1)
        blocks = torch.where(valid, self.pass_table(p).long().gather(1, index), self.sink)
        flat = lambda x: x.transpose(1, 2).reshape(b * t, heads, dim)  # noqa: E731
        self.store.write_token(layer, blocks.reshape(-1), (pos % self.block_size).reshape(-1), flat(k), flat(v))


# a prefill pass of at most this many rows attends row by row with no mask (the fused kernels' causal paths); more
# rows attend together through one mask (per-row offsets and lengths), so the kernel count stays bounded
ROWS_ONE_BY_ONE = 2


class ServingAttention:
    """A block's attention core in serving mode: stores the pass's new K/V through the block table, then attends
    (paged decode kernel for one token a row; a prefill chunk over the row's keys gathered through the table)."""

    def __init__(self, kv: ServingKV, layer: int, backend: str, timer):
        self.kv, self.layer, self.backend, self.timer = kv, layer, backend, timer

    def nbytes(self) -> int:
        return self.kv.nbytes() // self.kv.store.kv.shape[0]

    def __call__(self, q, k, v, step):  # q, k, v: [b, H, T, D]; step: model.transformer.Step (its lengths)
        p = self.kv.current
        with self.timer("attention"):
            self.kv.write(self.layer, p, k, v)
            table = self.kv.pass_table(p)
            if not p.prefill:
                lens, plan = self.kv.decode_plan(p, lambda p: p.start + 1, q.shape[1])
                out, _ = paged_decode(q[:, :, 0], *self.kv.store.layer(self.layer), table, lens, plan=plan,
                                      build=False)
                return out.to(q.dtype)[:, :, None]
            if len(p.host_lens) <= ROWS_ONE_BY_ONE and not p.one_mask:
                return self._chunks(q, table, p)
            width = -(-p.upto // self.kv.block_size)
            keys, values = self.kv.store.dense(self.layer, table[:, :width].long(), p.upto)
            return attention(q, keys, values, kv_lens=p.start + p.lens, causal=True, backend=self.backend,
                             q_offset=p.start)[0]

    def _chunks(self, q, table, p):
        """Each row's chunk over its own keys, one row at a time: the keys before it and its own are exactly the
        first start + n of the row, so no mask is needed and a fused kernel's causal path applies; the rows'
        padding stays zero. On CUDA in half precision that is flash's bottom-right causal kernel: cuDNN's would build
        a plan for every new (start, n), and a serving step's chunks rarely repeat a shape."""
        out = torch.zeros_like(q)
        bs = self.kv.block_size
        backend = "sdpa_flash" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else self.backend
        for i, (start, n) in enumerate(zip(p.host_start, p.host_lens)):
            keys, values = self.kv.store.dense(self.layer, table[i: i + 1, : -(-(start + n) // bs)].long(), start + n)
            out[i: i + 1, :, :n] = attention(q[i: i + 1, :, :n], keys, values, causal=True, backend=backend,
                                             q_offset=start)[0]
        return out
