"""FA Pool: a tensor-parallel base group holds the weights; attention of long sequences runs on a pool.

Ranks 0..tp-1 form the base group (TP as in model/parallel/tp.py: embeddings, norms, QKV and output
projections, FFN, LM head). Ranks tp..tp+pool-1 form the attention pool and hold no weights, only KV blocks.

The parts, each in its own module:
- block_table.py   resource management: which pool rank holds which block (numpy, replicated on every rank)
- fa_pool_plan.py  the per-step plan: index tensors and message sizes of every layer, uploaded once a step
- paged_kv.py      storage: one preallocated block tensor per rank (the base's short sequences too)
- transport.py     batched point-to-point messages, one per peer per layer and micro-batch
- ../paged_attention.py  the attention core's kernel: paged decode attention returning (out, lse)
- fa_pool_base_rank.py  a base rank's program (`FAPoolBaseRank`): prefill, the decode step, and
                        `PoolAttentionCore`, the base's attention core, plugged into each `Block` like `LocalKV`
- fa_pool_pool_rank.py  a pool rank's program (`FAPoolPoolRank`): receive, paged attention, node merge, send
This module holds what both roles share (`FAPoolRank`: topology, scheduling, storage reset, migration, the
elasticity log, the report) and `fa_pool_engine`, which builds the program of a rank's role.

Per decode step:
  1. resource management (every rank, identical): sequences whose context would exceed `threshold` move their
     KV blocks from the base to the pool (one message per base rank and pool rank pair); every pooled
     sequence gets room for its new token; the plan is built and uploaded.
  2. per layer and micro-batch, the base computes q, k, v for its heads, stores the new token of short
     sequences and attends over them locally (pooled rows have no base tokens: lse = -inf); for pooled rows it
     sends one message to each serving pool rank (q of served rows, k and v of rows whose last block it holds).
  3. each pool rank stores the new tokens, attends over its blocks, and the partials (fp32 out + LSE) are
     merged by their LSE: hierarchical = at a leader per node, then at the base; flat = at the base. The base
     merges its own partial and all delivered ones in one vectorized call.
  4. with async_overlap, the base starts every micro-batch of a layer (QKV, local attention, messages) before
     it finishes any (merge, output projection, FFN), so that pool attention overlaps base work; with wavefront
     too, micro-batch m of the next layer starts as soon as m of this one finished (fa_pool_plan.base_unit_order).
Prefill (`prefill`): prompts longer than the threshold are placed in the pool first; the base runs the prompts
chunk by chunk (strategy.prefill_chunk) and sends each chunk's K/V of their blocks straight to the pool ranks
that hold them, layer by layer; a long row's chunk attends over itself on the base and over the earlier chunks
in the pool (partials merged by LSE). The base never holds a long prompt's KV; nothing migrates after prefill.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from model.attention import merge_partials
from model.parallel import fa_pool_plan
from model.parallel.block_table import BlockTable
from model.parallel.engine import Engine, micro_batches, param_bytes
from model.parallel.graphs import EagerProgram, GraphedProgram
from model.parallel.paged_kv import PagedKV
from model.parallel.tp import CommStats, new_groups
from model.parallel.transport import Transport
from model.transformer import pad_prompts


def role_of(rank: int, strategy) -> str:
    """A rank's role: the base group's ranks come first (0..tp-1), the pool's after them."""
    return "base" if rank < strategy.tp else "pool"


def fa_pool_engine(model_cfg, strategy, rank, world, device, dtype, backend, timer) -> "FAPoolRank":
    """The FA Pool rank of a static batch: a base rank's program or a pool rank's, by the rank's role."""
    if role_of(rank, strategy) == "base":
        from model.parallel.fa_pool_base_rank import FAPoolBaseRank as cls
    else:
        from model.parallel.fa_pool_pool_rank import FAPoolPoolRank as cls
    return cls(model_cfg, strategy, rank, world, device, dtype, backend, timer)


def merge_scattered(parts, index, groups: int, rows: int, first=None) -> tuple:
    """merge_partials of partials packed as [n, H, D + 1] (out, then LSE): row i of `parts` is row index[i] of
    `groups` stacked groups of `rows` rows; `first` (if given) fills the first group. Rows nobody fills weigh
    nothing (LSE -inf). Returns (out [rows, H, D] fp32, lse [rows, H]): a fixed handful of kernels."""
    like = parts if first is None else first
    dim = like.shape[-1] - 1
    stacked = like.new_zeros(groups * rows, *like.shape[1:])
    stacked[..., dim] = float("-inf")
    if first is not None:
        stacked[:rows] = first
    stacked.index_copy_(0, index, parts)
    stacked = stacked.view(groups, rows, *like.shape[1:])
    return merge_partials(stacked[..., :dim], stacked[..., dim])


class FAPoolRank(Engine):
    """What a base rank and a pool rank share: the configuration and topology, the block table and the scheduler
    (replicated on every rank, so every rank plans the same step), this rank's block storage (`kv`), migration,
    the captured steps, the elasticity log and the report. Each role fills in its program through the methods
    below that raise NotImplementedError; `me` is this rank's pool index (-1 on the base)."""

    me = -1
    kv = None  # this rank's block storage (PagedKV): the base's short sequences, or a pool rank's blocks
    table_dev = None  # a pool rank's block table on its device (the base has none); prefill plans read it

    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        super().__init__(timer)
        pool = strategy.pool
        self.tp, self.pool_size = strategy.tp, pool.size
        self.rank = rank
        self.n_layers, self.n_heads, self.head_dim = model_cfg.n_layers, model_cfg.n_heads, model_cfg.head_dim
        self.local_heads = self.n_heads // self.tp
        self.vocab_size, self.hidden = model_cfg.vocab_size, model_cfg.hidden
        self.prefill_chunk = strategy.prefill_chunk
        self.threshold = pool.threshold if pool.size > 0 else math.inf  # no pool: everything stays on the base
        self.block_size, self.micro_batches = pool.block_size, strategy.micro_batches
        self.prefill_micro_batches = pool.prefill_micro_batches
        self.async_overlap, self.wavefront, self.kv_memory_fraction = pool.async_overlap, pool.wavefront, \
            pool.kv_memory_fraction
        self.topo = fa_pool_plan.Topology(self.tp, pool.size, pool.gpus_per_node, pool.hierarchical)
        self.table_args = (pool.size, pool.max_size, pool.block_size, pool.policy, pool.tokens_per_rank)
        self.device, self.dtype, self.backend = device, dtype, backend
        self.stats = CommStats()
        self.transport = Transport(self.stats)
        self.elasticity = []
        # destroy_process_group can hang at teardown after captured steps (pytorch/pytorch#115388): the runner
        # bounds it.
        self.use_graphs = strategy.cuda_graphs and torch.device(device).type == "cuda"
        self._forget_captured_steps()
        base_group = new_groups([list(range(self.tp))], rank)  # every rank takes part in creating it
        self.back_group = dist.new_group(list(range(world)))  # partials travel back to the base on their own
        self._hold_weights(model_cfg, rank, base_group)
        dist.barrier()  # every rank in one collective first: NCCL point-to-point batches need the communicator

    # -- what each role fills in ------------------------------------------------------------------------
    def _hold_weights(self, model_cfg, rank, base_group):
        """Set self.modules: the weights this rank holds."""
        raise NotImplementedError

    def _pool_slots(self, max_len: int) -> int:
        """Pool blocks this rank preallocates for a batch up to max_len tokens."""
        raise NotImplementedError

    def _reset_storage(self, batch: int, max_blocks: int, slots: int):
        """This rank's storage and device tables for a fresh batch, kept where their shape still fits."""
        raise NotImplementedError

    def _upload_own_table(self):
        """Bring this rank's device block table up to the host's."""
        raise NotImplementedError

    def _prefill_begin(self):
        """Before a prefill's first chunk: what the chunks write into (passed to each, then to _prefill_end)."""
        raise NotImplementedError

    def _prefill_chunk(self, tokens, lens, start, t, groups, plans, state):
        """One chunk of the prompts through every layer: this rank's side."""
        raise NotImplementedError

    def _prefill_end(self, state):
        """After a prefill's last chunk: the first tokens where this rank produces them, else None."""
        raise NotImplementedError

    def _migration_messages(self, per_rank) -> tuple[list, list]:
        """(sends, recvs) of a migration: per_rank lists (pool index, rows of `new` placed on it) with rows."""
        raise NotImplementedError

    def _land_migrated(self, new: np.ndarray, recvs: list):
        """Store the blocks a migration's receives brought (recvs as _migration_messages gave them)."""
        raise NotImplementedError

    def _decode_step(self, tokens):
        """This rank's side of a planned decode step; the next tokens where this rank knows them, else None."""
        raise NotImplementedError

    def _own_seqs(self, in_pool: np.ndarray) -> np.ndarray:
        """Mask of the sequences whose KV this rank holds (some of it)."""
        raise NotImplementedError

    def _own_blocks(self, in_pool: np.ndarray) -> int:
        """Blocks this rank's storage holds now."""
        raise NotImplementedError

    # -- setup -----------------------------------------------------------------------------------------
    def _reset(self, lens: torch.Tensor, max_len: int):
        """Fresh bookkeeping for a batch; storage is allocated once and kept while its shape fits."""
        self.batch = batch = len(lens)
        max_blocks = -(-max_len // self.block_size)
        slots = self._pool_slots(max_len)
        self.table = BlockTable(batch, *self.table_args, me=self.me, slots=slots, max_blocks_per_seq=max_blocks)
        self.sched = fa_pool_plan.Scheduler(lens.cpu().numpy(), max_len, self.threshold, self.table, self.topo,
                                            micro_batches(batch, self.micro_batches), self.me, self.device)
        self._reset_storage(batch, max_blocks, slots)
        self.sched.static_plan = self._static_plan
        self.step_no = 0
        self.peak_blocks, self.kv_seqs, self.logged_version, self.placement = 0, [], -1, {}

    def release_graphs(self):
        self._forget_captured_steps()

    @property
    def warmup_generations(self) -> int:
        """A plan signature is captured the second time it comes, and the first decode step's (its new blocks) comes
        once per generation: two warm-up generations, so that the measured one only replays (after one, its first
        steps would run eagerly and be captured inside the timed generation)."""
        return 2 if self.use_graphs else 1

    def _forget_captured_steps(self):
        """Captured steps by plan signature, the signatures seen once, and the plan buffer they read: all dropped
        together whenever a buffer they point at is replaced."""
        self.programs, self.seen, self.plan_buffer = {}, set(), None

    def _static_plan(self, n: int) -> torch.Tensor:
        """The plan's device buffer; growing it moves the plan, so the steps captured so far are dropped."""
        if self.plan_buffer is None or len(self.plan_buffer) < n:
            self.plan_buffer = torch.zeros(max(n, 2 * len(self.plan_buffer) if self.plan_buffer is not None else n),
                                           dtype=torch.long, device=self.device)
            self.programs = {}
        return self.plan_buffer

    def _storage(self, current, slots, heads):
        if current is not None and current.slots == slots and current.kv.shape[3] == heads:
            return current  # the warm-up's storage serves the measured generation: no new allocation
        self.kv = current = None  # free the old storage before allocating the new one
        return PagedKV(self.n_layers, slots, heads, self.block_size, self.head_dim, self.dtype, self.device)

    # -- prefill -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts, max_len):
        """Prompts chunk by chunk (strategy.prefill_chunk tokens, whole pool blocks; the whole prompt when 0).
        Long prompts are placed in the pool first, and each chunk's K/V of their blocks goes straight to the
        pool rank that holds them, layer by layer: the base never holds a long prompt's KV. A long row's chunk
        attends locally over the chunk (causal) and in the pool over the chunks before it, merged by LSE; a
        short row's chunk attends over the base cache. The rows go in strategy.pool.prefill_micro_batches groups,
        at most one per row (see FAPoolBaseRank._prefill_chunk). The LM head runs on each prompt's last position."""
        tokens, lens = pad_prompts(prompts, self.device)
        self._reset(lens, max_len)
        long = self.sched.long_now()
        placed = self.sched.admit(long)  # (seq, block, rank, local index) of every block of the long prompts
        self._upload_own_table()
        total, bs = tokens.shape[1], self.block_size
        chunk = self.prefill_chunk or -(-total // bs) * bs
        lens_np = lens.cpu().numpy()
        parts = min(self.batch, self.prefill_micro_batches)  # at most one group per row
        groups = [slice(r.start, r.stop) for r in micro_batches(self.batch, parts)]
        state = self._prefill_begin()
        for start in range(0, total, chunk):
            t = min(chunk, total - start)
            plans = [fa_pool_plan.PrefillChunk(self.sched, self.table_dev, placed, long, lens_np, start, t,
                                               self.pool_size, self.me, self.device, rows=rows) for rows in groups]
            self._prefill_chunk(tokens, lens, start, t, groups, plans, state)
        out = self._prefill_end(state)
        self._log(self.table.allocated, 0)
        return out

    @torch.no_grad()
    def synthetic_prefill(self, lens, max_len, seed):
        self._reset(lens, max_len)
        gen = torch.Generator(device=self.device).manual_seed(seed + max(self.rank, 0))
        self.sched.admit(self.sched.long_now())  # straight into pool blocks, no migration
        self._upload_own_table()
        self.kv.fill_random(gen)
        self._log(self.table.allocated, 0)
        first = torch.randint(0, self.vocab_size, (self.batch,), generator=torch.Generator().manual_seed(seed))
        return first.to(self.device) if self.has_tokens else None

    def _migrate(self, seqs: np.ndarray) -> int:
        """Place `seqs` in the pool with their cached tokens and move their blocks there: one message per
        (base rank, pool rank) pair, all posted at once."""
        if len(seqs) == 0:
            return 0
        new = self.sched.admit(seqs)
        per_rank = []
        for p in range(self.pool_size):
            rows = new[new[:, 2] == p]
            if len(rows):
                per_rank.append((p, rows))
        sends, recvs = self._migration_messages(per_rank)
        Transport.wait(self.transport.exchange(sends, recvs))
        self._land_migrated(new, recvs)
        return len(new)

    # -- decode ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens):
        self.step_no += 1
        allocated_before = self.table.allocated
        with self.timer("resource_management"):
            moved = self._plan_step()
        self._log(self.table.allocated - allocated_before, moved)
        out = self._decode_step(tokens)
        self.sched.advance()
        return out

    def _plan_step(self) -> int:
        """Migration of sequences crossing the threshold, room for the new token, the step's plan."""
        moved = self._migrate(self.sched.crossing())
        self.plan = self.sched.plan_step()
        return moved

    def _run_step(self, build):
        """This rank's step from build(program): eager the first time a plan of this shape (its signature) comes,
        captured the second time, replayed from then on; eager while the phase timers run."""
        sig = self.plan.signature
        program = self.programs.get(sig) if self.timer_off() else None
        if program is None and self.use_graphs and self.timer_off() and sig in self.seen:
            program = self.programs[sig] = build(GraphedProgram(self.stats)).finish()
        if program is None:
            build(EagerProgram())
        else:
            program.replay()
        self.seen.add(sig)

    # -- bookkeeping --------------------------------------------------------------------------------------
    def _log(self, allocated: int, migrated: int):
        """One elasticity entry; the per-sequence placement is rebuilt only when it changed."""
        in_pool = self.sched.in_pool
        if self.table.version != self.logged_version:
            pooled = np.nonzero(in_pool)[0]
            part = self.table.participates()[pooled]
            self.placement = {str(s): np.nonzero(row)[0].tolist() for s, row in zip(pooled.tolist(), part)}
            self.logged_version = self.table.version
            self.kv_seqs = np.nonzero(self._own_seqs(in_pool))[0].tolist()
        held = int(self.table.held.sum())
        self.peak_blocks = max(self.peak_blocks, self._own_blocks(in_pool))
        self.elasticity.append({"step": self.step_no, "pool_ranks_per_seq": self.placement, "blocks_allocated": allocated,
                                "blocks_migrated": migrated, "blocks_freed": 0, "blocks_held": held})

    def finish(self):
        with self.timer("resource_management"):
            self.table.check()
            freed = self.table.free(np.nonzero(self.sched.in_pool)[0])
            self.table.check()
        self.elasticity.append({"step": "finish", "pool_ranks_per_seq": {}, "blocks_allocated": 0, "blocks_migrated": 0,
                                "blocks_freed": freed, "blocks_held": int(self.table.held.sum())})
        self.sched.in_pool[:] = False

    def report(self):
        storage = self.kv
        block_bytes = storage.block_bytes() if storage is not None else 0
        return {"role": self.role, "weight_bytes": param_bytes(self.modules), "kv_bytes": self.peak_blocks * block_bytes,
                "kv_allocated_bytes": storage.nbytes() if storage is not None else 0,
                "comm_bytes": dict(self.stats.bytes), "comm_ops": dict(self.stats.ops),
                "cuda_graphs": bool(self.programs), "pool_block_bytes": block_bytes, "kv_seqs": self.kv_seqs,
                "blocks_allocated": self.table.allocated, "blocks_freed": self.table.freed}
