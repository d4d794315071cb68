"""The FA Pool's per-step plan: from the replicated block table, the index tensors every layer needs.

Built once per decode step, with numpy operations over all sequences at once, and uploaded to the device as
one int64 buffer (one host-to-device copy); every layer then reuses the same views. Per micro-batch:
- which rows each pool rank serves (it holds blocks of them) and which rows' new token it stores (it holds
  their last block);
- what a base rank sends to each pool rank: q of the served rows and k, v of the stored rows, as one message
  (`send_index` gathers them from the stacked [q; k; v] rows);
- who delivers partials to the base (every serving pool rank, or one leader per node), which rows each
  brings, and where they land in the stacked partials the base merges (`merge_index`);
- on a pool rank: its block-table rows, its tokens of each served row, where the new tokens go, and, on a
  node leader, where the members' partials land before the node-level merge.
The number of arrays and messages depends on the pool size and micro-batch count only, never on the batch
size or the number of blocks, so a decode step launches the same kernels whatever those are.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from model.parallel.block_table import BlockTable
from model.parallel.paged_kv import to_blocks


def base_unit_order(layers: int, micro: int, async_overlap: bool, wavefront: bool) -> list[tuple[str, int, int]]:
    """The base's step as ("begin" | "finish", layer, micro-batch) events. begin: QKV, local attention and the
    message to the pool; finish: the partials' merge, projection and FFN. The begins always come in (layer,
    micro-batch) order, the order the pool serves them in, so every rank posts its messages in the same order.
    - not async_overlap: each unit finishes before the next begins;
    - async_overlap: every micro-batch of a layer begins before any finishes;
    - wavefront (with async_overlap): micro-batch m of layer l + 1 begins as soon as m of layer l finished, so
      the pool has the next layer's micro-batch to attend while the base finishes the others."""
    if not async_overlap:
        return [(kind, layer, m) for layer in range(layers) for m in range(micro) for kind in ("begin", "finish")]
    if not wavefront:
        return [(kind, layer, m) for layer in range(layers) for kind in ("begin", "finish") for m in range(micro)]
    order = [("begin", 0, m) for m in range(micro)]
    for layer in range(layers):
        for m in range(micro):
            order.append(("finish", layer, m))
            if layer + 1 < layers:
                order.append(("begin", layer + 1, m))
    return order


@dataclass
class Topology:
    """Who is who: base ranks 0..tp-1, pool rank p is global rank tp + p; nodes of gpus_per_node ranks."""

    tp: int
    pool_size: int
    gpus_per_node: int
    hierarchical: bool

    def __post_init__(self):
        node = [(self.tp + p) // self.gpus_per_node for p in range(self.pool_size)]
        self.leader_of = [node.index(node[p]) for p in range(self.pool_size)]  # lowest pool rank of p's node
        self.members_of = {g: [q for q in range(self.pool_size) if self.leader_of[q] == g] for g in set(self.leader_of)}

    def leader(self, p: int) -> int:
        """The pool rank that merges the partials of p's node (hierarchical reduction)."""
        return self.leader_of[p]

    def members(self, leader: int) -> list[int]:
        return self.members_of[leader]

    def sources(self) -> list[int]:
        """Pool ranks that deliver partials to the base."""
        return sorted(self.members_of) if self.hierarchical else list(range(self.pool_size))


@dataclass
class MicroPlan:
    rows: slice  # batch rows of this micro-batch
    pooled: bool  # some row attends in the pool
    # base rank: one message to each pool rank in `to_pool` of send_sizes[i] rows; partial rows from `sources`
    to_pool: list = field(default_factory=list)
    send_sizes: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    recv_sizes: list = field(default_factory=list)
    # pool rank
    serves: int = 0  # rows served here
    stores: int = 0  # rows whose new token is stored here
    contributors: list = field(default_factory=list)  # leader: pool ranks whose partials it merges (itself first)
    contrib_sizes: list = field(default_factory=list)
    delivers: int = 0  # rows this rank delivers to the base (0: none, or not a source)
    t: dict = field(default_factory=dict)  # name -> device index tensor (views of the step's one upload)


class StepPlan:
    """Built by `build()`; `micro[m]` for micro-batch m; `plan[name]` for the step-wide arrays (`cache_lens`
    [B] and the `extra` ones), all views of one device buffer."""

    def __init__(self, micro: list[MicroPlan], tensors: dict, device, static=None):
        """static(n) -> an int64 device buffer of at least n elements that outlives the plan (the base's CUDA graphs
        read their plan there), or None: a fresh buffer per step."""
        names = list(tensors)
        arrays = [np.asarray(tensors[n], np.int64).ravel() for n in names]
        # each array starts on a 16-byte boundary (an even int64 offset): Triton specializes a kernel on its
        # pointers' alignment, and views at offsets that change from step to step would compile new variants
        padded = [np.pad(a, (0, len(a) % 2)) for a in arrays]
        flat = torch.from_numpy(np.concatenate(padded) if padded else np.zeros(0, np.int64))
        if static is not None:
            flat = static(len(flat))[: len(flat)].copy_(flat.pin_memory() if flat.device.type == "cpu" and
                                                       torch.device(device).type == "cuda" else flat, non_blocking=True)
        elif torch.device(device).type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        views = [v[: len(a)] for v, a in zip(torch.split(flat, [len(a) for a in padded]), arrays)]
        # what a captured step depends on besides the values: every array's length and every message's size
        self.signature = (tuple(len(a) for a in arrays),
                          tuple((mp.pooled, tuple(mp.to_pool), tuple(mp.send_sizes), tuple(mp.sources),
                                 tuple(mp.recv_sizes)) for mp in micro))
        self.micro = micro
        self.by_start = {mp.rows.start: mp for mp in micro}
        self.tensors = dict(zip(names, views))
        for m, mp in enumerate(micro):
            mp.t = {n[1]: v for n, v in self.tensors.items() if isinstance(n, tuple) and n[0] == m}

    def __getitem__(self, name):
        return self.tensors[name]

    def micro_at(self, rows: slice) -> MicroPlan:
        return self.by_start[rows.start]


def build(sched: "Scheduler", extra: dict | None = None) -> StepPlan:
    """The plan of one decode step, from the scheduler's state (its block table already holds room for this
    step's token). `extra` arrays are uploaded with the plan."""
    table, topo, cache_lens, in_pool, me = sched.table, sched.topo, sched.lens, sched.in_pool, sched.me
    bs = table.block_size
    total = cache_lens + 1
    part_all = table.participates() & in_pool[:, None]
    tokens_all = table.local_tokens(total) if me >= 0 else None
    tensors = {"cache_lens": cache_lens, **(extra or {})}
    micro = []
    for m, rows in enumerate(sched.rows):
        r0, r1 = rows.start, rows.stop
        b = r1 - r0
        pooled = in_pool[r0:r1]
        part = part_all[r0:r1]  # [b, P]
        tail_rank = np.where(pooled, table.last_rank[r0:r1], -1)
        mp = MicroPlan(rows=slice(r0, r1), pooled=bool(pooled.any()))
        # base: write the new token in the base cache (pooled rows go to the trash slot) and attend there
        seq = np.arange(r0, r1)
        tensors[(m, "base_slot")] = np.where(pooled, sched.trash_slot, sched.base_slots(seq, cache_lens[r0:r1] // bs))
        tensors[(m, "base_offset")] = np.where(pooled, 0, cache_lens[r0:r1] % bs)
        tensors[(m, "base_lens")] = np.where(pooled, 0, total[r0:r1])
        # base -> pool: per pool rank, q of its served rows then k and v of its stored rows
        serve_p, serve_row = np.nonzero(part.T)  # sorted by pool rank, then row
        tail_row = np.nonzero(tail_rank >= 0)[0]
        tail_p = tail_rank[tail_row]
        kind = np.r_[np.zeros(len(serve_p)), np.ones(len(tail_p)), np.full(len(tail_p), 2)]
        peer = np.r_[serve_p, tail_p, tail_p]
        index = np.r_[serve_row, b + tail_row, 2 * b + tail_row]
        order = np.lexsort((index, kind, peer))
        tensors[(m, "send_index")] = index[order]
        n_serve = np.bincount(serve_p, minlength=topo.pool_size)
        n_tail = np.bincount(tail_p, minlength=topo.pool_size)
        mp.to_pool = [int(p) for p in np.nonzero(n_serve)[0]]
        mp.send_sizes = [int(n_serve[p] + 2 * n_tail[p]) for p in mp.to_pool]
        # partials -> base: each source's rows, placed at (1 + source index) * b + row in the stacked partials
        deliver_rows = {}
        for src in topo.sources():
            group = topo.members(src) if topo.hierarchical else [src]
            r = np.nonzero(part[:, group].any(axis=1))[0]
            if len(r):
                deliver_rows[src] = r
        mp.sources = list(deliver_rows)
        mp.recv_sizes = [len(r) for r in deliver_rows.values()]
        tensors[(m, "merge_index")] = np.concatenate(
            [(1 + i) * b + r for i, r in enumerate(deliver_rows.values())]) if deliver_rows else np.zeros(0)
        if me >= 0:
            _pool_side(mp, m, tensors, table, topo, me, part, tail_rank, tokens_all, total, r0, deliver_rows)
        micro.append(mp)
    return StepPlan(micro, tensors, sched.device, sched.static_plan)


def _pool_side(mp, m, tensors, table, topo, me, part, tail_rank, tokens_all, total, r0, deliver_rows):
    bs = table.block_size
    served = np.nonzero(part[:, me])[0]
    stored = np.nonzero(tail_rank == me)[0]
    mp.serves, mp.stores = len(served), len(stored)
    tensors[(m, "table_rows")] = r0 + served
    tensors[(m, "local_lens")] = tokens_all[r0 + served, me]
    last_local = table.counts[r0 + stored, me] - 1
    tensors[(m, "tail_slot")] = table.table[r0 + stored, last_local]
    tensors[(m, "tail_offset")] = (total[r0 + stored] - 1) % bs
    if topo.hierarchical and topo.leader(me) == me:
        union = deliver_rows.get(me, np.zeros(0, np.int64))
        contributors = [me] + [q for q in topo.members(me) if q != me]
        pieces = [(q, np.nonzero(part[:, q])[0]) for q in contributors]
        pieces = [(q, r) for q, r in pieces if len(r) or q == me]
        mp.contributors = [q for q, _ in pieces]
        mp.contrib_sizes = [len(r) for _, r in pieces]
        tensors[(m, "leader_index")] = np.concatenate(
            [i * len(union) + np.searchsorted(union, r) for i, (_, r) in enumerate(pieces)])
        mp.delivers = len(union)
    elif not topo.hierarchical:
        mp.delivers = len(served)


class Scheduler:
    """Resource management of one rank, identical on every rank: the sequences' lengths, which of them are
    pooled, the block table, and each decode step's plan. No communication: the engine moves the data."""

    def __init__(self, lens: np.ndarray, max_len: int, threshold: float, table: BlockTable, topo: Topology,
                 micro_rows: list[range], me: int, device):
        self.lens = np.asarray(lens, np.int64).copy()  # tokens in the cache per sequence
        self.batch = len(self.lens)
        self.in_pool = np.zeros(self.batch, bool)
        self.threshold, self.table, self.topo, self.rows, self.me, self.device = threshold, table, topo, micro_rows, me, device
        self.static_plan = None  # StepPlan's `static`: set by an engine that replays captured steps
        self.base_blocks = -(-int(min(max_len, threshold)) // table.block_size)  # a base cache row, in blocks
        # a base cache row only for the sequences that start short: one that starts long never comes back
        starts_short = self.lens <= threshold
        self.base_rows = int(starts_short.sum())
        self.base_row = np.where(starts_short, np.cumsum(starts_short) - 1, -1)
        self.trash_slot = self.base_rows * self.base_blocks  # where pooled rows' new tokens go on the base: never read

    def base_slots(self, seqs: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Slots of the base cache holding block `blocks` of each of `seqs` (sequences that started short)."""
        return self.base_row[seqs] * self.base_blocks + blocks

    def base_table(self) -> np.ndarray:
        """[batch, base_blocks]: each sequence's base cache blocks; the trash slot for those with no row."""
        rows = self.base_slots(np.arange(self.batch)[:, None], np.arange(self.base_blocks)[None, :])
        return np.where(self.base_row[:, None] >= 0, rows, self.trash_slot)

    def long_now(self) -> np.ndarray:
        """Sequences above the threshold that are not pooled yet (at prefill)."""
        return np.nonzero(~self.in_pool & (self.lens > self.threshold))[0]

    def crossing(self) -> np.ndarray:
        """Sequences whose next token takes them above the threshold: they move to the pool before it."""
        return np.nonzero(~self.in_pool & (self.lens + 1 > self.threshold))[0]

    def admit(self, seqs: np.ndarray) -> np.ndarray:
        """Pool `seqs` with their cached tokens; returns their blocks (seq, block, rank, local index)."""
        new = self.table.place(seqs, self.lens[seqs])
        self.in_pool[seqs] = True
        return new

    def plan_step(self) -> StepPlan:
        """Room for every pooled sequence's next token, and the step's plan (after any admission)."""
        pooled = np.nonzero(self.in_pool)[0]
        new = self.table.grow(pooled, self.lens[pooled] + 1)
        extra = {}
        if self.me >= 0:  # this rank's new blocks enter its device block table with the plan's upload
            mine = new[new[:, 2] == self.me]
            extra = {"new_seq": mine[:, 0], "new_local": mine[:, 3], "new_slot": self.table.table[mine[:, 0], mine[:, 3]]}
        return build(self, extra)

    def advance(self) -> None:
        self.lens += 1


class PrefillChunk:
    """What every rank needs for one prefill chunk of t tokens at `start` (a multiple of the block size), from
    the block table after the long prompts were placed (identical on every rank; numpy, then one upload each):
    - short rows (they start at or below the threshold): their base cache rows and lengths;
    - long rows: their new tokens in the chunk, and per pool rank p the chunk's blocks that p holds, as (long
      row index, block index within the chunk) in (sequence, block) order: what a base rank sends to p;
    - on pool rank `me`: the slots of its blocks of the chunk (same order), and per long row its block-table row
      and its tokens before the chunk (the keys the row's queries see on `me`)."""

    def __init__(self, sched: Scheduler, table_dev, placed: np.ndarray, long: np.ndarray, lens: np.ndarray,
                 start: int, t: int, pool_size: int, me: int, device, rows: slice | None = None):
        """rows: the sequences this plan covers (a group of the prefill; None: all). `long`, `short` and `placed`
        keep global sequence numbers; long_dev and short_dev index the group's own tensors (row - rows.start)."""
        bs = sched.table.block_size
        self.start, self.t, self.block = start, t, bs
        lo, hi = (rows.start, rows.stop) if rows is not None else (0, len(lens))
        inside = lambda seqs: (seqs >= lo) & (seqs < hi)  # noqa: E731
        self.long = long = long[inside(long)]
        short = np.nonzero(sched.base_row >= 0)[0]
        self.short = short[inside(short)]
        placed = placed[inside(placed[:, 0])]
        dev = lambda a: torch.as_tensor(np.asarray(a, np.int64), device=device)  # noqa: E731
        self.long_dev, self.short_dev = dev(long - lo), dev(self.short - lo)
        self.short_base_row = dev(sched.base_row[self.short])
        self.short_lens = dev(lens[self.short])
        new = np.clip(lens[long] - start, 0, t)
        self.long_new = None if (new == t).all() else dev(new)  # None: every long row fills the chunk, no mask
        first, n_blocks = start // bs, -(-t // bs)
        in_chunk = placed[(placed[:, 1] >= first) & (placed[:, 1] < first + n_blocks)]
        in_chunk = in_chunk[np.lexsort((in_chunk[:, 1], in_chunk[:, 0]))]  # by sequence, then block
        long_index = np.full(len(lens), -1, np.int64)
        long_index[long] = np.arange(len(long))
        self.pool_li, self.pool_cb = [], []
        for p in range(pool_size):
            mine = in_chunk[in_chunk[:, 2] == p]
            self.pool_li.append(dev(long_index[mine[:, 0]]))
            self.pool_cb.append(dev(mine[:, 1] - first))
        if me >= 0:
            mine = in_chunk[in_chunk[:, 2] == me]
            self.my_slots = dev(sched.table.table[mine[:, 0], mine[:, 3]])
            held = placed[placed[:, 2] == me]  # this rank's tokens of each long row before the chunk
            before = np.minimum(start, lens[held[:, 0]]) - held[:, 1] * bs
            tokens = np.zeros(len(lens), np.int64)
            np.add.at(tokens, held[:, 0], np.clip(before, 0, bs))
            # every one of them is before the chunk, so visible to all its queries: dense keys, no causal mask
            held_long = tokens[long]
            self.my_upto = int(held_long.max()) if len(long) else 0
            self.my_blocks = table_dev.index_select(0, dev(long))[:, : -(-self.my_upto // bs)].long()
            self.my_kv_lens = None if (held_long == self.my_upto).all() else dev(held_long)

    def blocked(self, *xs: torch.Tensor):
        """[n, h, t, D] -> [n, h, chunk blocks, block, D] (zero-padded to whole blocks)."""
        return [to_blocks(x, self.block) for x in xs]
