"""FA Pool serving a changing batch (trace replay), by role: the base group's program and a pool rank's program.

Ranks 0..tp-1 are the base: the static engine's tensor-parallel program (model/parallel/static.py) with one
attention core changed. Ranks tp..tp+pool-1 are the pool: no weights, only KV blocks of all heads.

Where a request's KV lives is the scheduler's (harness/serving/scheduler.PoolPlacement): block ids are one space,
the base's blocks first, then each pool rank's range. A request whose context passes the threshold holds all its
blocks in the pool, a proportional share of pool ranks (more as it grows); one that crosses the threshold while
decoding migrates there: before the step's passes each base rank sends its heads of the moved blocks to the pool
ranks that receive them (one message per base and pool rank pair).

Per layer of a pass, the base computes q, k, v of its heads for every row, stores the tokens of rows it holds and
attends over them (pooled rows see no base key: LSE -inf). If the pass has pooled rows it sends their q, k, v (one
message per pool rank in use; keys and values only to the ranks holding a block of the pass's new tokens). Each
pool rank stores the tokens whose blocks it holds, gathers each row's blocks it holds (at most the count the
scheduler sends: its share of the keys, not the rows' span) and attends over them (decode: the paged kernel; a
prefill chunk: a mask by position, so its queries see exactly the keys before them), and sends the partials (fp32
out and LSE) back; the base merges its own and the pool's by LSE (flat: no node level). A pool rank that holds no
block of the pass's rows is not sent anything: the set of pool ranks in use grows and shrinks with the long
requests in the batch. Base and pool take turns within a layer (no overlap in serving).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from model.attention import attention, masked_attention, merge_partials
from model.paged_attention import paged_decode, pass_plan
from model.parallel.engine import Engine
from model.parallel.fa_pool import role_of
from model.parallel.serving_kv import ServingKV
from model.parallel.static import StaticEngine
from model.parallel.tp import CommStats, new_groups


def pool_range(rank: int, tp: int, base_blocks: int, pool_blocks: int) -> int:
    """The first block id pool rank `rank` (a world rank >= tp) holds."""
    return base_blocks + (rank - tp) * pool_blocks


def pool_placement(pool_cfg, block_tokens: int) -> SimpleNamespace:
    """Where a request's KV goes, in the scheduler's terms (harness/serving/scheduler.PoolPlacement): past
    pool_cfg.threshold tokens in the pool, blocks_per_rank blocks on one pool rank before the next (proportional:
    tokens_per_rank of them; 0: round robin over every pool rank)."""
    per_rank = -(-pool_cfg.tokens_per_rank // block_tokens) if pool_cfg.policy == "proportional" else 0
    return SimpleNamespace(threshold=pool_cfg.threshold, ranks=pool_cfg.size, blocks_per_rank=per_rank)


class FAPoolServing:
    """What base and pool ranks share: the topology and the placement they tell the scheduler."""

    def _setup_roles(self, strategy):
        self.tp, self.pool_size, self.pool_cfg = strategy.tp, strategy.pool.size, strategy.pool
        self.pool_ranks = list(range(self.tp, self.tp + self.pool_size))

    def serve_placement(self, block_tokens: int):
        return pool_placement(self.pool_cfg, block_tokens)

    def _moved_to(self, migrations, dest: int):
        """The (base block, pool block) pairs of a step's migrations whose pool block pool rank `dest` (a world
        rank) holds, and the first block id of its range."""
        lo = pool_range(dest, self.tp, self.base_blocks, self.pool_blocks)
        mine = (migrations[:, 1] >= lo) & (migrations[:, 1] < lo + self.pool_blocks)
        return migrations[mine], lo


class PooledServingAttention:
    """The base's attention core: its own rows over its blocks, pooled rows' partials from the pool, merged."""

    def __init__(self, engine: "FAPoolServingBase", layer: int):
        self.engine, self.layer, self.timer = engine, layer, engine.timer

    def nbytes(self) -> int:
        return self.engine.serving.nbytes() // self.engine.serving.store.kv.shape[0]

    def __call__(self, q, k, v, step):  # q, k, v: [b, h, T, D], this base rank's heads
        e, kv = self.engine, self.engine.serving
        p = kv.current
        with self.timer("attention"):
            kv.write(self.layer, p, k, v)
            table = kv.pass_table(p)
            zero = torch.zeros_like(p.start)
            if p.prefill:
                # the keys the base's own rows span (the pooled rows' keys are the pool's)
                span = max((a + n for a, n, pooled in zip(p.host_start, p.host_lens, p.host_pooled) if not pooled),
                           default=0)
                if span:
                    lens = torch.where(p.pooled, zero, p.start + p.lens)
                    keys, values = kv.store.dense(self.layer, table[:, :-(-span // kv.block_size)].long(), span)
                    out, lse = attention(q, keys, values, kv_lens=lens, causal=True, backend=e.backend,
                                         q_offset=p.start)
                else:  # every row pooled: no key here
                    out, lse = torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), device=q.device)
            else:
                lens, plan = kv.decode_plan(p, lambda p: torch.where(p.pooled, zero, p.start + 1), q.shape[1])
                out, lse = paged_decode(q[:, :, 0], *kv.store.layer(self.layer), table, lens, plan=plan, build=False)
                out, lse = out[:, :, None], lse[:, :, None]
        if not p.pool_ranks:
            return out.to(q.dtype)
        n, d = len(p.pool_rows), q.shape[-1]
        qkv = torch.stack((q, k, v))[:, p.pool_rows].contiguous()  # [3, n, h, T, D]
        msgs = [qkv if r in p.pool_writes else qkv[:1] for r in p.pool_ranks]  # keys and values to their stores only
        parts = [torch.empty(n, q.shape[1], q.shape[2], d + 1, dtype=torch.float32, device=q.device) for _ in p.pool_ranks]
        with self.timer("communication"):
            works = [dist.isend(m, dst=r) for m, r in zip(msgs, p.pool_ranks)] + \
                [dist.irecv(x, src=r) for x, r in zip(parts, p.pool_ranks)]
        e.stats.add("base_to_pool", sum(m.nbytes for m in msgs), len(p.pool_ranks))
        e.stats.add("pool_to_base", parts[0].nbytes * len(parts), len(parts))
        with self.timer("synchronization"):
            for w in works:
                w.wait()
        with self.timer("communication"):  # the reduction: this rank's partial and each pool rank's, by LSE
            stacked = torch.zeros(1 + len(parts), *out.shape[:3], d + 1, dtype=torch.float32, device=q.device)
            stacked[..., d] = float("-inf")
            stacked[0, ..., :d], stacked[0, ..., d] = out.float(), lse
            for i, part in enumerate(parts):
                stacked[1 + i].index_copy_(0, p.pool_rows, part)
            merged, _ = merge_partials(stacked[..., :d], stacked[..., d])
        return merged.to(q.dtype)


class FAPoolServingBase(FAPoolServing, StaticEngine):
    """A base rank: static TP (one stage) whose attention core sends pooled rows to the pool."""

    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        self._setup_roles(strategy)
        # the static engine's fields for one tensor-parallel stage: no pipeline to schedule, and blocks of the pool's
        # size (serving keeps its KV in serve_setup's blocks; these size only a static batch's cache)
        one_stage = SimpleNamespace(**vars(strategy), schedule="continuous", kv_block=strategy.pool.block_size)
        StaticEngine.__init__(self, model_cfg, one_stage, rank, world, device, dtype, backend, timer)
        self.rank, self.role = rank, "base"

    def serve_setup(self, slots: int, kv_blocks: int, block_size: int, max_blocks: int, pool_blocks: int = 0) -> None:
        self.base_blocks, self.pool_blocks = kv_blocks, pool_blocks
        super().serve_setup(slots, kv_blocks, block_size, max_blocks)

    serve_capturable = False  # its attention core sends and receives eagerly

    def _serving_core(self, layer: int):
        return PooledServingAttention(self, layer)

    @torch.no_grad()
    def serve_step(self, passes, table_updates, migrations=None):
        self._send_migrated(migrations)
        return super().serve_step(passes, table_updates)

    def _send_migrated(self, migrations):
        """Send each pool rank its moved blocks, this rank's heads, all posted at once."""
        if migrations is None or not len(migrations):
            return
        works, store = [], self.serving.store
        for peer in self.pool_ranks:
            pairs, _ = self._moved_to(migrations, peer)
            if not len(pairs):
                continue
            blocks = store.read_blocks(pairs[:, 0].to(self.device)).contiguous()
            self.stats.add("migration", blocks.nbytes)
            works.append(dist.isend(blocks, dst=peer))
        for w in works:
            w.wait()

    def report(self):
        return {**super().report(), "role": "base"}


class FAPoolServingPool(FAPoolServing, Engine):
    """A pool rank: KV blocks of every head; per layer of a pass it serves, the pooled rows' attention over them."""

    role, has_tokens, has_logits = "pool", False, False

    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        super().__init__(timer)
        self._setup_roles(strategy)
        self.rank, self.device, self.dtype, self.backend = rank, device, dtype, backend
        self.n_layers, self.heads, self.head_dim = model_cfg.n_layers, model_cfg.n_heads, model_cfg.head_dim
        self.heads_per_base = model_cfg.n_heads // self.tp
        self.stats = CommStats()
        new_groups([list(range(self.tp))], rank)  # the base's TP group: every rank takes part in creating it
        if world > 1 and torch.device(device).type == "cuda":
            dist.barrier()
        self.serving = None

    def serve_block_tokens(self, block_size: int) -> int:
        return block_size

    def serve_block_bytes(self, block_size: int) -> int:
        return 2 * self.n_layers * self.heads * block_size * self.head_dim * self.dtype.itemsize

    def serve_setup(self, slots: int, kv_blocks: int, block_size: int, max_blocks: int, pool_blocks: int = 0) -> None:
        self.base_blocks, self.pool_blocks = kv_blocks, pool_blocks
        first = pool_range(self.rank, self.tp, kv_blocks, pool_blocks)
        self.serving = ServingKV(self.n_layers, slots, pool_blocks, self.heads, block_size, self.head_dim, max_blocks,
                                 self.dtype, self.device, first_id=first)

    @torch.no_grad()
    def serve_step(self, passes, table_updates, migrations=None):
        self.serving.update_table(table_updates)
        with self.timer("resource_management"):
            self._receive_migrated(migrations)
        for p, _ in passes:
            if self.rank in p.pool_ranks:
                rows = p.sub(p.pool_rows)
                self.serving.current = rows  # what the pass's layers share is computed once (ServingKV.of_pass)
                for layer in range(self.n_layers):
                    self._attend(layer, p, rows)
        return None

    def _receive_migrated(self, migrations):
        """Receive the blocks moved to this rank from each base rank in turn (its heads) and store them."""
        if migrations is None or not len(migrations):
            return
        pairs, lo = self._moved_to(migrations, self.rank)
        if not len(pairs):
            return
        store, h = self.serving.store, self.heads_per_base
        for peer in range(self.tp):
            shape = (store.kv.shape[0], 2, len(pairs), h, store.block_size, store.kv.shape[-1])
            blocks = torch.empty(shape, dtype=store.kv.dtype, device=self.device)
            dist.recv(blocks, src=peer)
            store.write_blocks((pairs[:, 1] - lo).to(self.device), blocks, slice(peer * h, (peer + 1) * h))

    def _attend(self, layer: int, p, rows) -> None:
        """One layer of a pass (rows: its pooled rows): q, k, v of them from every base rank, partials back to
        each."""
        kv, h, d = self.serving, self.heads_per_base, self.head_dim
        n, t = len(p.pool_rows), p.width
        stores = self.rank in p.pool_writes  # this rank holds a block of the pass's new tokens: q, k, v; else q
        msgs = [torch.empty(3 if stores else 1, n, h, t, d, dtype=self.dtype, device=self.device) for _ in range(self.tp)]
        with self.timer("synchronization"):
            for w in [dist.irecv(m, src=b) for b, m in enumerate(msgs)]:
                w.wait()
        qkv = torch.cat(msgs, dim=2)  # [3 or 1, n, H, T, D]: the base ranks' heads in order
        q = qkv[0]
        with self.timer("attention"):
            if stores:
                kv.write(layer, rows, qkv[1], qkv[2])
            out, lse = self._partial(layer, q, rows, p.pool_blocks[p.pool_ranks.index(self.rank)])
        packed = torch.cat((out, lse[..., None]), dim=-1)  # [n, H, T, D + 1] fp32
        with self.timer("communication"):
            works = [dist.isend(packed[:, b * h:(b + 1) * h].contiguous(), dst=b) for b in range(self.tp)]
            for w in works:
                w.wait()
        self.stats.add("pool_to_base", packed.nbytes, self.tp)

    def _partial(self, layer, q, rows, blocks: int):
        """Attention of the rows' queries over the keys of this rank's blocks (the rows' other blocks are elsewhere).
        Decode: the paged kernel over the rows' blocks here (all of a row's keys here precede its query; only the
        row's last block may be partly filled, and it sorts last). A prefill chunk: a mask by position (causal) and
        length over the gathered keys. The gathered table, and a decode pass's lengths and work list, are the same
        in every layer: computed once a pass (_pass_blocks)."""
        kv, bs = self.serving, self.serving.block_size
        table, here, first, ends, lens, plan = kv.of_pass(rows, "pool",
                                                          lambda: self._pass_blocks(rows, blocks, q.shape[1]))
        if not rows.prefill:
            out, lse = paged_decode(q[:, :, 0], *kv.store.layer(layer), table, lens, plan=plan, build=False)
            return out[:, :, None].float(), lse[:, :, None]
        keys, values = kv.store.dense(layer, table.long(), table.shape[1] * bs)
        key_pos = (first[:, :, None] + torch.arange(bs, device=q.device)).flatten(1)  # [n, blocks * bs]
        query_pos = rows.start[:, None] + torch.arange(q.shape[2], device=q.device)  # [n, T]
        visible = (here.repeat_interleave(bs, dim=1)[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
                   & (key_pos < ends[:, None])[:, None, :])
        out, lse = masked_attention(q, keys, values, visible[:, None], self.backend)
        return out.float(), lse

    def _pass_blocks(self, rows, blocks: int, heads: int):
        """(table, here, first, ends, lens, plan) of a pass's rows on this rank: each row's blocks here gathered in
        position order into `blocks` columns (the scheduler's count: the most blocks one of the rows holds on this
        rank), so the work is this rank's share of the keys, not the rows' span; here marks the gathered entries
        that are the row's, first their first positions, ends the rows' lengths once the pass is stored. A decode
        pass adds the tokens of each row here (lens) and the paged kernel's work list for them (pass_plan); a
        prefill pass None for both."""
        kv, bs = self.serving, self.serving.block_size
        span = -(-rows.upto // bs)
        local = kv.local_table(rows.slots)[:, :span]
        ends = rows.start + rows.lens
        block_start = torch.arange(span, device=local.device) * bs
        owned = (local != kv.sink) & (block_start[None, :] < ends[:, None])  # stale entries past a row's end: not its
        order = torch.sort((~owned).to(torch.uint8), dim=1, stable=True).indices[:, :min(blocks, span)]  # owned first
        here = owned.gather(1, order)
        table = torch.where(here, local.gather(1, order), kv.sink).int()
        first = block_start[order]  # [n, blocks]: the gathered blocks' first positions
        if rows.prefill:
            return table, here, first, ends, None, None
        lens = ((ends[:, None] - first).clamp(0, bs) * here).sum(1).to(torch.int32)
        return table, here, first, ends, lens, pass_plan(lens, table.shape[1], bs, heads)

    def report(self):
        kv = self.serving.nbytes() if self.serving else 0
        return {"role": "pool", "weight_bytes": 0, "kv_bytes": kv, "comm_bytes": dict(self.stats.bytes),
                "comm_ops": dict(self.stats.ops), "tp_rank": None, "stage": None, "cuda_graphs": False}


def serving_engine(model_cfg, strategy, rank, world, device, dtype, backend, timer):
    """The FA Pool rank of a trace replay: a base rank's serving program or a pool rank's, by the rank's role."""
    cls = FAPoolServingBase if role_of(rank, strategy) == "base" else FAPoolServingPool
    return cls(model_cfg, strategy, rank, world, device, dtype, backend, timer)
