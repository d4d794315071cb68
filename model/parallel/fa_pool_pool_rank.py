"""FA Pool, a pool rank's program: no weights, KV blocks of every head; attention of the pooled rows over them.

Per layer and micro-batch of a decode step that it serves, a pool rank receives the pooled rows' q and new k, v
from every base rank, stores the new tokens whose blocks it holds, attends over its blocks (paged decode
attention, partials as fp32 out + LSE), merges its node's partials at the node's leader (hierarchical), and
sends the partials back to the base, each base rank's heads. In prefill it stores each chunk's K/V of its blocks
and attends the long rows' queries over its blocks of the chunks before. What it shares with a base rank
(scheduling, migration, the log, the report) is model/parallel/fa_pool.py's `FAPoolRank`.
"""
from __future__ import annotations

from functools import partial

import torch

from model.attention import attention
from model.paged_attention import paged_decode
from model.parallel import fa_pool_plan
from model.parallel.fa_pool import FAPoolRank, merge_scattered
from model.parallel.transport import Transport, split_rows


class FAPoolPoolRank(FAPoolRank):
    """A pool rank (tp..tp+pool-1, pool index `me`): its blocks of every head (`kv`) and its block table on the
    device (`table_dev`), where captured steps read them."""

    role, has_tokens, has_logits = "pool", False, False

    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        self.me = rank - strategy.tp
        super().__init__(model_cfg, strategy, rank, world, device, dtype, backend, timer)

    def _hold_weights(self, model_cfg, rank, base_group):
        self.modules = torch.nn.ModuleList()  # the pool holds no weights

    # -- setup -----------------------------------------------------------------------------------------
    def _reset_storage(self, batch, max_blocks, slots):
        kv = self.kv
        self.kv = self._storage(self.kv, slots, self.n_heads)
        if self.kv is not kv or self.table_dev is None or self.table_dev.shape != (batch, max_blocks):
            self.table_dev = torch.zeros(batch, max_blocks, dtype=torch.int32, device=self.device)
            self._forget_captured_steps()  # they point at the old table
        else:
            self.table_dev.zero_()  # in place, where the captured steps read it

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
        held = self.kv.nbytes() if self.kv is not None else 0
        return min(most, int((free + cached + held) * self.kv_memory_fraction) // block)

    def _upload_own_table(self):
        self.table_dev.copy_(torch.from_numpy(self.table.table))

    # -- prefill -----------------------------------------------------------------------------------------
    def _prefill_begin(self):
        return None

    def _prefill_end(self, state):
        return None

    def _prefill_chunk(self, tokens, lens, start, t, groups, plans, state):
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
                    self.kv.kv[layer, i].index_copy_(0, plan.my_slots, blocks)
            if not q_rows:
                return None
            # dense attention over this rank's blocks of each row, gathered once per chunk and layer (the decode
            # kernel, one query per row, would read a row's blocks once for each of the chunk's t queries)
            q = x[:q_rows].view(n, t, self.n_heads, self.head_dim).transpose(1, 2)
            keys, values = self.kv.dense(layer, plan.my_blocks, plan.my_upto)
            o, lse = attention(q, keys, values, kv_lens=plan.my_kv_lens, backend=self.backend)
            part = torch.cat([o.float(), lse[..., None]], dim=-1).transpose(1, 2).reshape(q_rows, self.n_heads, -1)
        return part.view(q_rows, self.tp, self.local_heads, -1).transpose(0, 1).contiguous()

    # -- migration -----------------------------------------------------------------------------------------
    def _migration_messages(self, per_rank):
        """The blocks moved to this rank, from every base rank (its heads of every layer)."""
        recvs = []
        for p, rows in per_rank:
            if p != self.me:
                continue
            for r in range(self.tp):
                buf = torch.empty(self.n_layers, 2, len(rows), self.local_heads, self.block_size, self.head_dim,
                                  dtype=self.dtype, device=self.device)
                recvs.append((r, buf, "migrate_from_base"))
        return [], recvs

    def _land_migrated(self, new, recvs):
        if not recvs:
            return
        slots = torch.as_tensor(self.table.slots_of(new), device=self.device, dtype=torch.long)
        for r, buf, _ in recvs:
            h0 = r * self.local_heads
            self.kv.write_blocks(slots, buf, slice(h0, h0 + self.local_heads))
        self._upload_own_table()

    # -- decode ------------------------------------------------------------------------------------------
    def _plan_step(self) -> int:
        moved = super()._plan_step()
        # this rank's new blocks of the step into its device block table
        self.table_dev[self.plan["new_seq"], self.plan["new_local"]] = self.plan["new_slot"].to(torch.int32)
        return moved

    def _decode_step(self, tokens):
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
            self.kv.write_token(layer, mp.t["tail_slot"], mp.t["tail_offset"], x[n : n + s], x[n + s :])
            table = self.table_dev.index_select(0, mp.t["table_rows"])
            o, lse = paged_decode(x[:n], *self.kv.layer(layer), table, mp.t["local_lens"])
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
    def _own_seqs(self, in_pool):
        return self.table.participates()[:, self.me]

    def _own_blocks(self, in_pool):
        return int(self.table.held[self.me])
