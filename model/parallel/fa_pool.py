"""FA Pool: a tensor-parallel base group holds the weights; attention of long sequences runs on a pool.

Ranks 0..tp-1 form the base group (TP as in model/parallel/tp.py: embeddings, norms, QKV and output
projections, FFN, LM head). Ranks tp..tp+pool-1 form the attention pool and hold no weights, only KV blocks.

The parts, each in its own module:
- block_table.py   resource management: which pool rank holds which block (numpy, replicated on every rank)
- fa_pool_plan.py  the per-step plan: index tensors and message sizes of every layer, uploaded once a step
- paged_kv.py      storage: one preallocated block tensor per rank (the base's short sequences too)
- transport.py     batched point-to-point messages, one per peer per layer and micro-batch
- ../paged_attention.py  the attention core's kernel: paged decode attention returning (out, lse)
This module ties them together: `PoolAttentionCore` is the base's attention core, plugged into each
`Block` like `LocalKV`; `FAPoolEngine._pool_attend` is a pool rank's side of one layer and micro-batch.

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
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from model.attention import attention, merge_partials
from model.paged_attention import paged_decode
from model.parallel import fa_pool_plan
from model.parallel.block_table import BlockTable
from model.parallel.engine import Engine, micro_batches, param_bytes
from model.parallel.graphs import EagerProgram, GraphedProgram
from model.parallel.paged_kv import PagedKV
from model.parallel.tp import (CommStats, VocabParallelEmbedding, VocabParallelHead, new_groups, shard_attention,
                               shard_ffn)
from model.parallel.transport import Transport, split_rows
from model.transformer import Step, build_model, keep_prompt_ends, pad_prompts


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


class PendingPartials:
    """A micro-batch whose pooled rows attend in the pool: `post()` sends q, k, v there and posts the receives of
    the partials, `arrive()` waits for them (both eager, every step), `wait()` merges them with the local partial
    (compute: part of a captured segment)."""

    def __init__(self, core, local, msg, received, mp):
        self.core, self.local, self.msg, self.received, self.mp = core, local, msg, received, mp
        self.works = []

    def post(self):
        e, mp = self.core.engine, self.mp
        with self.core.timer("communication"):
            self.works = e.transport.exchange(
                sends=[(e.tp + p, m, "base_to_pool") for p, m in zip(mp.to_pool, split_rows(self.msg, mp.send_sizes))],
                recvs=[(e.tp + p, m, "pool_to_base") for p, m in zip(mp.sources, split_rows(self.received, mp.recv_sizes))],
                recv_group=e.back_group)

    def arrive(self):
        with self.core.timer("synchronization"):
            Transport.wait(self.works)
        self.works = []

    def wait(self) -> torch.Tensor:
        core, mp = self.core, self.mp
        with core.timer("communication"):  # the last level of the reduction
            b = mp.rows.stop - mp.rows.start
            out, _ = merge_scattered(self.received, mp.t["merge_index"], 1 + len(mp.sources), b, first=self.local)
        return out.to(core.dtype)[:, :, None]  # [b, H_local, 1, D]


class PoolAttentionCore:
    """The base's attention core for one layer: short rows attend over the base's paged cache, pooled rows in
    the pool. Returns the output, or a PendingPartials (not yet posted) when some row of the micro-batch is pooled."""

    def __init__(self, engine: "FAPoolEngine", layer: int):
        self.engine, self.layer = engine, layer
        self.timer, self.dtype = engine.timer, engine.dtype

    def __call__(self, q, k, v, step: Step):  # q, k, v: [b, H_local, 1, D]
        e = self.engine
        mp = e.plan.micro_at(step.rows)
        q1, k1, v1 = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        with self.timer("attention"):
            e.base_kv.write_token(self.layer, mp.t["base_slot"], mp.t["base_offset"], k1, v1)
            out, lse = paged_decode(q1, *e.base_kv.layer(self.layer), e.base_table[mp.rows], mp.t["base_lens"])
        if not mp.pooled:
            return out.to(self.dtype)[:, :, None]
        b, heads, dim = q1.shape
        msg = torch.stack([q1, k1, v1]).view(3 * b, heads, dim).index_select(0, mp.t["send_index"])
        received = torch.empty(sum(mp.recv_sizes), heads, dim + 1, dtype=torch.float32, device=q.device)
        local = torch.cat([out, lse[..., None]], dim=-1)  # [b, H_local, D + 1] fp32
        return PendingPartials(self, local, msg, received, mp)


class FAPoolEngine(Engine):
    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        super().__init__(timer)
        pool = strategy.pool
        self.tp, self.pool_size = strategy.tp, pool.size
        self.rank, self.is_base = rank, rank < strategy.tp
        self.role = "base" if self.is_base else "pool"
        self.me = rank - self.tp if not self.is_base else -1  # pool index
        self.has_tokens, self.has_logits = self.is_base, rank == 0
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
        self.base_kv = self.pool_kv = self.x = self.base_table = self.table_dev = None
        # Captured steps with a tensor-parallel base once "hung" on 4 H200s: they had measured and recorded, and
        # destroy_process_group hung at teardown (pytorch/pytorch#115388), which the runner now bounds.
        self.use_graphs = strategy.cuda_graphs and torch.device(device).type == "cuda"
        self._forget_captured_steps()
        base_group = new_groups([list(range(self.tp))], rank)
        self.back_group = dist.new_group(list(range(world)))  # partials travel back to the base on their own
        if self.is_base:
            model = build_model(model_cfg, dtype, device)
            for layer, block in enumerate(model.blocks):
                shard_attention(block.attn, self.tp, rank, base_group, timer, self.stats)
                shard_ffn(block.ffn, self.tp, rank, base_group, timer, self.stats)
                block.attn.core = PoolAttentionCore(self, layer)
            self.embed = VocabParallelEmbedding(model.tok_emb, self.tp, rank, base_group, timer, self.stats)
            self.head = VocabParallelHead(model.lm_head, self.tp, rank, base_group, timer, self.stats)
            self.blocks, self.norm = model.blocks, model.norm
            self.modules = torch.nn.ModuleList([self.embed, self.blocks, self.norm, self.head]).to(device)
        else:
            self.modules = torch.nn.ModuleList()  # the pool holds no weights
        dist.barrier()  # every rank in one collective first: NCCL point-to-point batches need the communicator

    # -- setup -----------------------------------------------------------------------------------------
    def _reset(self, lens: torch.Tensor, max_len: int):
        """Fresh bookkeeping for a batch; storage is allocated once and kept while its shape fits."""
        self.batch = batch = len(lens)
        max_blocks = -(-max_len // self.block_size)
        slots = self._pool_slots(max_len) if not self.is_base else 0
        self.table = BlockTable(batch, *self.table_args, me=self.me, slots=slots, max_blocks_per_seq=max_blocks)
        self.sched = fa_pool_plan.Scheduler(lens.cpu().numpy(), max_len, self.threshold, self.table, self.topo,
                                            micro_batches(batch, self.micro_batches), self.me, self.device)
        if self.is_base:  # rows only for the sequences that start short, + the trash slot
            kv = self.base_kv
            self.base_kv = self._storage(self.base_kv, self.sched.trash_slot + 1, self.local_heads)
            table = torch.as_tensor(self.sched.base_table(), dtype=torch.int32)
            if self.base_kv is not kv or self.x is None or len(self.x) != batch or self.base_table.shape != table.shape:
                self._base_buffers(batch)  # captured steps point at these: new ones drop them
                self.base_table = table.to(self.device)
            else:
                self.base_table.copy_(table)  # in place, where the captured steps read it
            self.sched.static_plan = self._static_plan
        else:
            kv = self.pool_kv
            self.pool_kv = self._storage(self.pool_kv, slots, self.n_heads)
            if self.pool_kv is not kv or self.table_dev is None or self.table_dev.shape != (batch, max_blocks):
                self.table_dev = torch.zeros(batch, max_blocks, dtype=torch.int32, device=self.device)
                self._forget_captured_steps()  # they point at the old table
            else:
                self.table_dev.zero_()  # in place, where the captured steps read it
            self.sched.static_plan = self._static_plan
        self.step_no = 0
        self.peak_blocks, self.kv_seqs, self.logged_version, self.placement = 0, [], -1, {}

    def _base_buffers(self, batch):
        """The base step's inputs and outputs, where captured steps find them; new ones drop the captured steps."""
        dev = self.device
        self._forget_captured_steps()
        self.x = torch.zeros(batch, 1, self.blocks[0].attn.wqkv.in_features, dtype=self.dtype, device=dev)
        self.ones = torch.ones(batch, dtype=torch.long, device=dev)
        self.tokens_in = torch.zeros(batch, dtype=torch.long, device=dev)
        self.tokens_out = torch.zeros(batch, dtype=torch.long, device=dev)
        self.logits_out = torch.zeros(batch, self.vocab_size, dtype=torch.float32, device=dev)

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
        self.base_kv = self.pool_kv = current = None  # free the old storage before allocating the new one
        return PagedKV(self.n_layers, slots, heads, self.block_size, self.head_dim, self.dtype, self.device)

    def _pool_slots(self, max_len: int) -> int:
        """Blocks a pool rank preallocates: every sequence at max_len on this rank at most, capped on a GPU by
        kv_memory_fraction of the memory it could have: free on the device, cached by torch's allocator (the last
        generation's temporaries; counted as used by the device, so the cap shrank from one generation to the next:
        FA Pool 2+1 at 32K x 16 on 4x H200 ran out of blocks), and the blocks it holds now."""
        most = self.batch * -(-max_len // self.block_size)
        if self.device.type != "cuda":
            return most
        block = 2 * self.n_layers * self.n_heads * self.block_size * self.head_dim * torch.finfo(self.dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        held = self.pool_kv.nbytes() if self.pool_kv is not None else 0
        return min(most, int((free + cached + held) * self.kv_memory_fraction) // block)

    # -- prefill -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts, max_len):
        """Prompts chunk by chunk (strategy.prefill_chunk tokens, whole pool blocks; the whole prompt when 0).
        Long prompts are placed in the pool first, and each chunk's K/V of their blocks goes straight to the
        pool rank that holds them, layer by layer: the base never holds a long prompt's KV. A long row's chunk
        attends locally over the chunk (causal) and in the pool over the chunks before it, merged by LSE; a
        short row's chunk attends over the base cache. The rows go in strategy.pool.prefill_micro_batches groups,
        at most one per row (see _base_prefill_chunk). The LM head runs on each prompt's last position."""
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
        last = torch.zeros(self.batch, 1, self.hidden, dtype=self.dtype, device=self.device) if self.is_base else None
        for start in range(0, total, chunk):
            t = min(chunk, total - start)
            plans = [fa_pool_plan.PrefillChunk(self.sched, self.table_dev, placed, long, lens_np, start, t,
                                               self.pool_size, self.me, self.device, rows=rows) for rows in groups]
            if self.is_base:
                self._base_prefill_chunk(tokens, lens, start, t, groups, plans, last)
            else:
                self._pool_prefill_chunk(plans)
        out = self._emit(self.head(self.norm(last))[:, 0]) if self.is_base else None
        self._log(self.table.allocated, 0)
        return out

    def _base_prefill_chunk(self, tokens, lens, start, t, groups, plans, last):
        """One chunk through every layer on a base rank, its row groups in wavefront order
        (fa_pool_plan.base_unit_order): group g of layer l + 1 begins as soon as g of layer l finished, so the pool
        attends one group's layer while the base runs another's dense work. One group: each layer in turn.
        Writes each prompt ending in the chunk into `last`."""
        x, step, begun = {}, {}, {}
        for g, rows in enumerate(groups):
            step[g] = Step(rows, torch.full_like(lens[rows], start), (lens[rows] - start).clamp(0, t), prefill=True,
                           start=start)
            x[g] = self.embed(tokens[rows, start : start + t])
        for kind, layer, g in fa_pool_plan.base_unit_order(self.n_layers, len(groups), True, True):
            block = self.blocks[layer]
            if kind == "begin":
                q, k, v = block.attn.qkv(block.attn_norm(x[g]), step[g])
                begun[g] = self._begin_prefill_attention(q, k, v, step[g], plans[g], layer)
            else:
                h = x[g] + block.attn.project_out(self._finish_prefill_attention(*begun.pop(g)))
                x[g] = h + block.ffn(block.ffn_norm(h))
        for g, rows in enumerate(groups):
            last[rows] = keep_prompt_ends(last[rows], x[g], lens[rows], start)

    def _begin_prefill_attention(self, q, k, v, step: Step, plan: fa_pool_plan.PrefillChunk, layer: int):
        """One layer's attention over a chunk on a base rank, up to the pool's answer: short rows attend over the
        base cache; each long row's queries (after the first chunk) and the K/V of the chunk's blocks go to the pool
        ranks that hold them, one message each, and the chunk attends causally over itself here meanwhile.
        Returns (out, pending) for _finish_prefill_attention; out [B, h, t, D] for this rank's heads."""
        out = torch.zeros_like(q)
        if len(plan.short):
            rows = plan.short_dev
            with self.timer("attention"):
                out.index_copy_(0, rows, self._short_prefill(layer, q[rows], k[rows], v[rows], step, plan))
        if not len(plan.long):
            return out, None
        rows, t = plan.long_dev, q.shape[2]
        ql, kl, vl = q[rows], k[rows], v[rows]
        n, heads, _, dim = ql.shape
        q_rows = ql.transpose(1, 2).reshape(n * t, heads, dim) if plan.start else ql[:0, :, 0]
        sends = []
        for p in range(self.pool_size):
            # the chunk's blocks that p holds, each [block, h, D] rows: k's, then v's
            kv = [x.transpose(1, 2)[plan.pool_li[p], plan.pool_cb[p]].transpose(1, 2).reshape(-1, heads, dim)
                  for x in plan.blocked(kl, vl)]  # [n, h, blocks, bs, D] -> [m, h, bs, D] -> [m * bs, h, D]
            msg = torch.cat([q_rows, *kv])
            sends.append((self.tp + p, msg, "prefill_to_pool"))
        parts = torch.empty(self.pool_size, n * t if plan.start else 0, heads, dim + 1, dtype=torch.float32,
                            device=q.device)
        recvs = [(self.tp + p, parts[p], "prefill_partials") for p in range(self.pool_size)]
        with self.timer("communication"):
            works = self.transport.exchange(sends, recvs, recv_group=self.back_group)
        with self.timer("attention"):  # the chunk itself, causal, while the pool attends over the chunks before
            local, lse = attention(ql, kl, vl, kv_lens=plan.long_new, causal=True, backend=self.backend)
        return out, (plan, works, sends, parts, local, lse)

    def _finish_prefill_attention(self, out, pending):
        """The pool's partials of the long rows merged with their local ones (by LSE) into out."""
        if pending is None:
            return out
        plan, works, _, parts, local, lse = pending  # the sends stay referenced until their transfer is waited on
        with self.timer("synchronization"):
            Transport.wait(works)
        if not plan.start:  # the first chunk: nothing before it in the pool
            out.index_copy_(0, plan.long_dev, local)
            return out
        n, heads, t, dim = local.shape
        with self.timer("communication"):
            pool = parts.view(self.pool_size, n, t, heads, dim + 1).transpose(2, 3)  # [P, n, h, t, D + 1]
            outs = torch.cat([local.float()[None], pool[..., :dim]])
            lses = torch.cat([lse[None], pool[..., dim]])
            out.index_copy_(0, plan.long_dev, merge_partials(outs, lses)[0].to(out.dtype))
        return out

    def _short_prefill(self, layer, q, k, v, step: Step, plan: fa_pool_plan.PrefillChunk):
        """Short rows: the chunk's blocks into their base cache rows, attention over every cached position."""
        bs, kv = self.block_size, self.base_kv
        first = plan.start // bs
        room = self.sched.base_blocks - first  # a short prompt never reaches past its row
        if room <= 0:
            return torch.zeros_like(q)
        n_blocks = min(-(-q.shape[2] // bs), room)
        row_slots = plan.short_base_row * self.sched.base_blocks
        kv.write_prompt(layer, k, v, row_slots + first, n_blocks)
        upto = min(plan.start + q.shape[2], self.sched.base_blocks * bs)
        keys, values = kv.dense(layer, row_slots[:, None] + torch.arange(-(-upto // bs), device=q.device), upto)
        return attention(q, keys, values, kv_lens=plan.short_lens, causal=True, backend=self.backend,
                         q_offset=plan.start)[0]

    def _pool_prefill_chunk(self, plans):
        """Every layer of a chunk on a pool rank, its (layer, group) units in the order the base sends them. A unit's
        partials go out without the stream waiting for them, which it does before the next unit's go out. A unit's
        receive is posted only when its turn comes: posted earlier, it would wait on the base's next message while
        this rank's partials are still to be sent, and a host that stalls on the device meanwhile (a lazily loaded
        kernel, a cudaMalloc) would deadlock with a base host stalled the same way (it hung on 2 and 4 H200s)."""
        sent = ([], None)
        for layer in range(self.n_layers):
            for plan in plans:
                if not len(plan.long):
                    continue
                buf, works = self._post_prefill_receive(plan)
                with self.timer("synchronization"):  # waiting for the base (includes the transfer)
                    Transport.wait(works)
                packed = self._pool_prefill(layer, plan, buf)
                with self.timer("communication"):
                    Transport.wait(sent[0])
                    if packed is not None:  # (the works and the tensor they send, kept until waited on)
                        sent = (self.transport.exchange(sends=[(r, packed[r], "prefill_partials")
                                                               for r in range(self.tp)], send_group=self.back_group),
                                packed)
        with self.timer("communication"):
            Transport.wait(sent[0])

    def _post_prefill_receive(self, plan: fa_pool_plan.PrefillChunk):
        """Post the receive of one unit from every base rank: the long rows' queries (after the first chunk), then
        the K and V of this rank's blocks of the chunk, each base rank's heads. Returns (buffer, works)."""
        m, bs = len(plan.pool_li[self.me]), self.block_size
        q_rows = len(plan.long) * plan.t if plan.start else 0
        buf = torch.empty(self.tp, q_rows + 2 * m * bs, self.local_heads, self.head_dim, dtype=self.dtype,
                          device=self.device)
        return buf, self.transport.exchange(recvs=[(r, buf[r], "prefill_from_base") for r in range(self.tp)])

    def _pool_prefill(self, layer, plan: fa_pool_plan.PrefillChunk, buf):
        """One unit on a pool rank, its message received in buf: store this rank's blocks of the chunk; attend the
        long rows' queries over this rank's blocks before the chunk. Returns the partials packed per base rank
        ([tp, rows, H / tp, D + 1] fp32), or None in the first chunk (no queries)."""
        n, t, bs = len(plan.long), plan.t, self.block_size
        m = len(plan.pool_li[self.me])
        q_rows = n * t if plan.start else 0
        with self.timer("attention"):
            x = buf.transpose(0, 1).reshape(-1, self.n_heads, self.head_dim)  # heads back in order
            if m:
                for i, part in enumerate((x[q_rows : q_rows + m * bs], x[q_rows + m * bs :])):  # k, then v
                    blocks = part.view(m, bs, self.n_heads, self.head_dim).transpose(1, 2)
                    self.pool_kv.kv[layer, i].index_copy_(0, plan.my_slots, blocks)
            if not q_rows:
                return None
            # dense attention over this rank's blocks of each row, gathered once per chunk and layer (the decode
            # kernel, one query per row, would read a row's blocks once for each of the chunk's t queries)
            q = x[:q_rows].view(n, t, self.n_heads, self.head_dim).transpose(1, 2)
            keys, values = self.pool_kv.dense(layer, plan.my_blocks, plan.my_upto)
            o, lse = attention(q, keys, values, kv_lens=plan.my_kv_lens, backend=self.backend)
            part = torch.cat([o.float(), lse[..., None]], dim=-1).transpose(1, 2).reshape(q_rows, self.n_heads, -1)
        return part.view(q_rows, self.tp, self.local_heads, -1).transpose(0, 1).contiguous()

    @torch.no_grad()
    def synthetic_prefill(self, lens, max_len, seed):
        self._reset(lens, max_len)
        gen = torch.Generator(device=self.device).manual_seed(seed + max(self.rank, 0))
        self.sched.admit(self.sched.long_now())  # straight into pool blocks, no migration
        self._upload_own_table()
        (self.base_kv if self.is_base else self.pool_kv).fill_random(gen)
        self._log(self.table.allocated, 0)
        first = torch.randint(0, self.vocab_size, (self.batch,), generator=torch.Generator().manual_seed(seed))
        return first.to(self.device) if self.is_base else None

    def _upload_own_table(self):
        if not self.is_base:
            self.table_dev.copy_(torch.from_numpy(self.table.table))

    def _migrate(self, seqs: np.ndarray, source: PagedKV | None, source_slot) -> int:
        """Place `seqs` in the pool with their cached tokens and move their blocks there: one message per
        (base rank, pool rank) pair, all posted at once. source_slot(seqs, blocks) -> slots on the base."""
        if len(seqs) == 0:
            return 0
        new = self.sched.admit(seqs)
        sends, recvs, landing = [], [], []
        for p in range(self.pool_size):
            rows = new[new[:, 2] == p]
            if not len(rows):
                continue
            if self.is_base:
                slots = torch.as_tensor(source_slot(rows[:, 0], rows[:, 1]), device=self.device)
                sends.append((self.tp + p, source.read_blocks(slots).contiguous(), "migrate_to_pool"))
            elif p == self.me:
                for r in range(self.tp):
                    buf = torch.empty(self.n_layers, 2, len(rows), self.local_heads, self.block_size, self.head_dim,
                                      dtype=self.dtype, device=self.device)
                    recvs.append((r, buf, "migrate_from_base"))
                    landing.append((r, buf))
        Transport.wait(self.transport.exchange(sends, recvs))
        if landing:
            slots = torch.as_tensor(self.table.slots_of(new), device=self.device, dtype=torch.long)
            for r, buf in landing:
                h0 = r * self.local_heads
                self.pool_kv.write_blocks(slots, buf, slice(h0, h0 + self.local_heads))
            self._upload_own_table()
        return len(new)

    # -- decode ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens):
        self.step_no += 1
        allocated_before = self.table.allocated
        with self.timer("resource_management"):
            moved = self._plan_step()
        self._log(self.table.allocated - allocated_before, moved)
        out = self._decode_base(tokens) if self.is_base else self._decode_pool()
        self.sched.advance()
        return out

    def _plan_step(self) -> int:
        """Migration of sequences crossing the threshold, room for the new token, the step's plan."""
        moved = self._migrate(self.sched.crossing(), self.base_kv, self.sched.base_slots)
        self.plan = self.sched.plan_step()
        if not self.is_base:
            self.table_dev[self.plan["new_seq"], self.plan["new_local"]] = self.plan["new_slot"].to(torch.int32)
        return moved

    def _decode_base(self, tokens):
        """The base's step, written once as a program (model/parallel/graphs.py): eager the first time a plan of
        this shape (its signature) comes, captured the second time, replayed from then on."""
        self.tokens_in.copy_(tokens)
        self._run_step(self._base_step)
        if self.keep_logits:
            self.logits.append(self.logits_out.clone())
        return self.tokens_out.clone()

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

    def _base_step(self, program):
        """Embedding, the layers' micro-batches (begin: local attention and the message; post; arrive; finish:
        merge, projection, FFN) in the order fa_pool_plan.base_unit_order gives (async_overlap, wavefront: how
        pool attention overlaps base work), LM head."""
        x, ones = self.x, self.ones
        program.seg(lambda: x.copy_(self.embed(self.tokens_in[:, None])))
        # (layer, micro-batch) -> its unit in flight. Keyed by layer too: a captured step's eager operations look
        # their unit up at every replay, after the capture left each key at the unit it made (keyed by micro-batch
        # alone, every layer's post and arrive found the last layer's unit on replay)
        pending = {}
        for kind, layer, m in fa_pool_plan.base_unit_order(len(self.blocks), len(self.plan.micro), self.async_overlap,
                                                          self.wavefront):
            block, mp = self.blocks[layer], self.plan.micro[m]
            if kind == "finish":
                self._finish(program, block, x, mp, pending, (layer, m))
                continue
            step = Step(mp.rows, self.plan["cache_lens"][mp.rows], ones[mp.rows])
            program.seg(partial(self._begin, block, x, step, pending, (layer, m)))
            if mp.pooled:
                program.eager(partial(self._post, pending, (layer, m)))
        program.seg(self._head)
        return program

    @staticmethod
    def _begin(block, x, step, pending, key):
        pending[key] = block.begin(x[step.rows], step)

    @staticmethod
    def _post(pending, key):
        pending[key].post()

    def _finish(self, program, block, x, mp, pending, key):
        if mp.pooled:
            program.eager(lambda: pending[key].arrive())
        program.seg(lambda: x[mp.rows].copy_(block.finish(x[mp.rows], pending[key])))

    def _head(self):
        logits = self.head(self.norm(self.x))[:, 0]
        self.logits_out.copy_(logits)
        self.tokens_out.copy_(logits.argmax(-1))


    def _decode_pool(self):
        self._run_step(self._pool_step)
        return None

    def _pool_step(self, program):
        for layer in range(self.n_layers):
            for mp in self.plan.micro:
                if mp.serves or mp.delivers:
                    self._pool_unit(program, layer, mp)
        return program

    def _pool_unit(self, program, layer, mp):
        """One layer and micro-batch on a pool rank: receive q and new k, v (eager), attend (compute), merge the
        node's partials at a leader (hierarchical), deliver the partials (eager). Buffers the messages land in
        are allocated here, before any capture, so that a captured step finds them every step."""
        heads, dim, tp = self.n_heads, self.head_dim, self.tp
        n, s = mp.serves, mp.stores
        out = {"part": torch.empty(0, heads, dim + 1, dtype=torch.float32, device=self.device)}
        if n:
            buf = torch.empty(tp, n + 2 * s, self.local_heads, dim, dtype=self.dtype, device=self.device)
            program.eager(partial(self._receive, [(r, buf[r], "from_base") for r in range(tp)], None))
            program.seg(partial(self._pool_attention, layer, mp, buf, out))
        if self.topo.hierarchical:
            leader = self.topo.leader(self.me)
            if leader != self.me:
                program.eager(lambda: self._send([(tp + leader, out["part"], "pool_to_pool")]))
                return
            sizes = mp.contrib_sizes[1:]
            received = torch.empty(sum(sizes), heads, dim + 1, dtype=torch.float32, device=self.device)
            program.eager(partial(self._receive, [(self.tp + q, m, "pool_from_pool") for q, m in
                                                  zip(mp.contributors[1:], split_rows(received, sizes))], self.back_group))
            program.seg(partial(self._merge_node, mp, out, received))
        program.seg(partial(self._pack, out))
        program.eager(lambda: self._send([(r, out["packed"][r], "pool_to_base") for r in range(tp)]))

    def _receive(self, recvs, group):
        with self.timer("synchronization"):  # waiting for the peer (includes the transfer)
            Transport.wait(self.transport.exchange(recvs=recvs, recv_group=group))

    def _send(self, sends):
        with self.timer("communication"):
            Transport.wait(self.transport.exchange(sends=sends, send_group=self.back_group))

    def _pool_attention(self, layer, mp, buf, out):
        n, s = mp.serves, mp.stores
        with self.timer("attention"):
            x = buf.transpose(0, 1).reshape(n + 2 * s, self.n_heads, self.head_dim)  # heads back in order
            self.pool_kv.write_token(layer, mp.t["tail_slot"], mp.t["tail_offset"], x[n : n + s], x[n + s :])
            table = self.table_dev.index_select(0, mp.t["table_rows"])
            o, lse = paged_decode(x[:n], *self.pool_kv.layer(layer), table, mp.t["local_lens"])
            out["part"] = torch.cat([o, lse[..., None]], dim=-1)  # [n, H, D + 1] fp32

    def _merge_node(self, mp, out, received):
        """Leader: merge the node members' partials (own first) over the rows the node delivers."""
        with self.timer("communication"):  # the first level of the reduction
            o, lse = merge_scattered(torch.cat([out["part"], received]), mp.t["leader_index"], len(mp.contributors),
                                     mp.delivers)
            out["part"] = torch.cat([o, lse[..., None]], dim=-1)

    def _pack(self, out):
        """[rows, H, D + 1] -> [tp, rows, H / tp, D + 1]: each base rank's heads contiguous, one message each."""
        part = out["part"]
        out["packed"] = part.view(part.shape[0], self.tp, self.local_heads, -1).transpose(0, 1).contiguous()

    # -- bookkeeping --------------------------------------------------------------------------------------
    def _log(self, allocated: int, migrated: int):
        """One elasticity entry; the per-sequence placement is rebuilt only when it changed."""
        in_pool = self.sched.in_pool
        if self.table.version != self.logged_version:
            pooled = np.nonzero(in_pool)[0]
            part = self.table.participates()[pooled]
            self.placement = {str(s): np.nonzero(row)[0].tolist() for s, row in zip(pooled.tolist(), part)}
            self.logged_version = self.table.version
            mine = ~in_pool if self.is_base else self.table.participates()[:, self.me]
            self.kv_seqs = np.nonzero(mine)[0].tolist()
        held = int(self.table.held.sum())
        self.peak_blocks = max(self.peak_blocks, int((~in_pool).sum()) * self.sched.base_blocks if self.is_base
                               else int(self.table.held[self.me]))
        self.elasticity.append({"step": self.step_no, "pool_ranks_per_seq": self.placement, "blocks_allocated": allocated,
                                "blocks_migrated": migrated, "blocks_freed": 0, "blocks_held": held})

    def _emit(self, logits):
        if self.keep_logits:
            self.logits.append(logits)
        return logits.argmax(-1)

    def finish(self):
        with self.timer("resource_management"):
            self.table.check()
            freed = self.table.free(np.nonzero(self.sched.in_pool)[0])
            self.table.check()
        self.elasticity.append({"step": "finish", "pool_ranks_per_seq": {}, "blocks_allocated": 0, "blocks_migrated": 0,
                                "blocks_freed": freed, "blocks_held": int(self.table.held.sum())})
        self.sched.in_pool[:] = False

    def report(self):
        storage = self.base_kv if self.is_base else self.pool_kv
        block_bytes = storage.block_bytes() if storage is not None else 0
        return {"role": self.role, "weight_bytes": param_bytes(self.modules), "kv_bytes": self.peak_blocks * block_bytes,
                "kv_allocated_bytes": storage.nbytes() if storage is not None else 0,
                "comm_bytes": dict(self.stats.bytes), "comm_ops": dict(self.stats.ops),
                "cuda_graphs": bool(self.programs), "pool_block_bytes": block_bytes, "kv_seqs": self.kv_seqs,
                "blocks_allocated": self.table.allocated, "blocks_freed": self.table.freed}
