"""FA Pool, a base rank's program: the tensor-parallel model whose attention core sends pooled rows to the pool.

A base rank holds its shard of every weight (model/parallel/tp.py) and the KV of the short sequences (its heads).
`PoolAttentionCore` is its attention core, plugged into each `Block` like `LocalKV`: short rows attend over the
base's paged cache, pooled rows in the pool (`PendingPartials`: the message out, the partials back, the merge).
`FAPoolBaseRank` runs prefill chunk by chunk and the decode step as a program (model/parallel/graphs.py); what it
shares with a pool rank (scheduling, migration, the log, the report) is model/parallel/fa_pool.py's `FAPoolRank`.
"""
from __future__ import annotations

from functools import partial

import torch

from model.attention import attention, merge_partials
from model.paged_attention import paged_decode
from model.parallel import fa_pool_plan
from model.parallel.fa_pool import FAPoolRank, merge_scattered
from model.parallel.tp import VocabParallelEmbedding, VocabParallelHead, shard_attention, shard_ffn
from model.parallel.transport import Transport, split_rows
from model.transformer import Step, build_model, keep_prompt_ends


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

    def __init__(self, engine: "FAPoolBaseRank", layer: int):
        self.engine, self.layer = engine, layer
        self.timer, self.dtype = engine.timer, engine.dtype

    def __call__(self, q, k, v, step: Step):  # q, k, v: [b, H_local, 1, D]
        e = self.engine
        mp = e.plan.micro_at(step.rows)
        q1, k1, v1 = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        with self.timer("attention"):
            e.kv.write_token(self.layer, mp.t["base_slot"], mp.t["base_offset"], k1, v1)
            out, lse = paged_decode(q1, *e.kv.layer(self.layer), e.base_table[mp.rows], mp.t["base_lens"])
        if not mp.pooled:
            return out.to(self.dtype)[:, :, None]
        b, heads, dim = q1.shape
        msg = torch.stack([q1, k1, v1]).view(3 * b, heads, dim).index_select(0, mp.t["send_index"])
        received = torch.empty(sum(mp.recv_sizes), heads, dim + 1, dtype=torch.float32, device=q.device)
        local = torch.cat([out, lse[..., None]], dim=-1)  # [b, H_local, D + 1] fp32
        return PendingPartials(self, local, msg, received, mp)


class FAPoolBaseRank(FAPoolRank):
    """A base rank (0..tp-1): its shard of the weights, the short sequences' KV (`kv`, this rank's heads) and their
    block table (`base_table`), and the step's inputs and outputs (`x`, `tokens_in`, ...) where captured steps
    read and write them."""

    role = "base"
    x = base_table = None

    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        self.has_logits = rank == 0
        super().__init__(model_cfg, strategy, rank, world, device, dtype, backend, timer)

    def _hold_weights(self, model_cfg, rank, base_group):
        timer = self.timer
        model = build_model(model_cfg, self.dtype, self.device)
        for layer, block in enumerate(model.blocks):
            shard_attention(block.attn, self.tp, rank, base_group, timer, self.stats)
            shard_ffn(block.ffn, self.tp, rank, base_group, timer, self.stats)
            block.attn.core = PoolAttentionCore(self, layer)
        self.embed = VocabParallelEmbedding(model.tok_emb, self.tp, rank, base_group, timer, self.stats)
        self.head = VocabParallelHead(model.lm_head, self.tp, rank, base_group, timer, self.stats)
        self.blocks, self.norm = model.blocks, model.norm
        self.modules = torch.nn.ModuleList([self.embed, self.blocks, self.norm, self.head]).to(self.device)

    # -- setup -----------------------------------------------------------------------------------------
    def _pool_slots(self, max_len: int) -> int:
        return 0  # the base holds no pool blocks

    def _reset_storage(self, batch, max_blocks, slots):
        """Rows only for the sequences that start short, + the trash slot."""
        kv = self.kv
        self.kv = self._storage(self.kv, self.sched.trash_slot + 1, self.local_heads)
        table = torch.as_tensor(self.sched.base_table(), dtype=torch.int32)
        if self.kv is not kv or self.x is None or len(self.x) != batch or self.base_table.shape != table.shape:
            self._base_buffers(batch)  # captured steps point at these: new ones drop them
            self.base_table = table.to(self.device)
        else:
            self.base_table.copy_(table)  # in place, where the captured steps read it

    def _base_buffers(self, batch):
        """The base step's inputs and outputs, where captured steps find them; new ones drop the captured steps."""
        dev = self.device
        self._forget_captured_steps()
        self.x = torch.zeros(batch, 1, self.blocks[0].attn.wqkv.in_features, dtype=self.dtype, device=dev)
        self.ones = torch.ones(batch, dtype=torch.long, device=dev)
        self.tokens_in = torch.zeros(batch, dtype=torch.long, device=dev)
        self.tokens_out = torch.zeros(batch, dtype=torch.long, device=dev)
        self.logits_out = torch.zeros(batch, self.vocab_size, dtype=torch.float32, device=dev)

    def _upload_own_table(self):
        pass  # the base's block table is fixed for the batch (base_table); pooled blocks are the pool's

    # -- prefill -----------------------------------------------------------------------------------------
    def _prefill_begin(self):
        return torch.zeros(self.batch, 1, self.hidden, dtype=self.dtype, device=self.device)  # each prompt's last

    def _prefill_end(self, last):
        return self._emit(self.head(self.norm(last))[:, 0])

    def _prefill_chunk(self, tokens, lens, start, t, groups, plans, last):
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
        bs, kv = self.block_size, self.kv
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

    # -- migration -----------------------------------------------------------------------------------------
    def _migration_messages(self, per_rank):
        """Each pool rank's moved blocks, this rank's heads of every layer, read from the base cache."""
        sends = []
        for p, rows in per_rank:
            slots = torch.as_tensor(self.sched.base_slots(rows[:, 0], rows[:, 1]), device=self.device)
            sends.append((self.tp + p, self.kv.read_blocks(slots).contiguous(), "migrate_to_pool"))
        return sends, []

    def _land_migrated(self, new, recvs):
        pass  # the base only sends

    # -- decode ------------------------------------------------------------------------------------------
    def _decode_step(self, tokens):
        """The base's step, written once as a program (model/parallel/graphs.py): eager the first time a plan of
        this shape (its signature) comes, captured the second time, replayed from then on."""
        self.tokens_in.copy_(tokens)
        self._run_step(self._base_step)
        if self.keep_logits:
            self.logits.append(self.logits_out.clone())
        return self.tokens_out.clone()

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

    def _emit(self, logits):
        if self.keep_logits:
            self.logits.append(logits)
        return logits.argmax(-1)

    # -- bookkeeping --------------------------------------------------------------------------------------
    def _own_seqs(self, in_pool):
        return ~in_pool

    def _own_blocks(self, in_pool):
        return int((~in_pool).sum()) * self.sched.base_blocks
