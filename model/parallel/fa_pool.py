"""FA Pool: a tensor-parallel base group holds the weights; attention of long sequences runs on a pool.

Ranks 0..tp-1 form the base group (TP as in model/parallel/tp.py: embeddings, norms, QKV and output
projections, FFN, LM head). Ranks tp..tp+pool-1 form the attention pool and hold no weights.

Per decode step:
  1. resource management (every rank, identical replicas of the block table): sequences whose context would
     exceed `threshold` move their KV from the base to pool blocks; every pooled sequence gets room for its
     new token (new blocks, and more pool ranks as the policy widens with length).
  2. per layer and micro-batch, each base rank computes q, k, v for its heads. Short sequences attend on the
     base. For long ones the base sends q to every pool rank holding blocks of that sequence, and the new
     k, v to the rank holding its last block.
  3. each pool rank computes partial attention (out + LSE) over its blocks and the partials are merged by
     their LSE: hierarchical = within a node at a leader rank, then across nodes at the base rank that owns
     those heads; flat = every pool rank sends straight to the base, which merges all.
  4. with async_overlap, a base rank issues all micro-batches of a layer before it completes any, so that
     pool attention of one micro-batch overlaps base work (QKV, output projection, FFN) of the others.
Prefill attention runs on the base; the KV of prompts longer than the threshold then moves to the pool.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from model.attention import attention, merge_partials
from model.parallel.block_manager import BlockManager
from model.parallel.engine import Engine, micro_batches, param_bytes
from model.parallel.tp import (CommStats, VocabParallelEmbedding, VocabParallelHead, new_groups, shard_attention,
                               shard_ffn, shard_range)
from model.transformer import Step, build_model, last_token_logits, pad_prompts

TAG_QKV, TAG_PARTIAL, TAG_LEADER, TAG_MIGRATE = 1, 2, 3, 4


class FAPoolEngine(Engine):
    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        super().__init__(timer)
        pool = strategy.pool
        self.tp, self.pool_size = strategy.tp, pool.size
        self.rank, self.is_base = rank, rank < strategy.tp
        self.role = "base" if self.is_base else "pool"
        self.me = rank - self.tp  # pool index (negative on base ranks)
        self.has_tokens, self.has_logits = self.is_base, rank == 0
        self.n_layers, self.n_heads, self.head_dim = model_cfg.n_layers, model_cfg.n_heads, model_cfg.head_dim
        self.vocab_size = model_cfg.vocab_size
        self.threshold = pool.threshold if pool.size > 0 else math.inf  # no pool: everything stays on the base
        self.block_size, self.micro_batches = pool.block_size, strategy.micro_batches
        self.hierarchical, self.async_overlap = pool.hierarchical, pool.async_overlap
        self.gpus_per_node = pool.gpus_per_node
        self.pool_args = (pool.size, pool.max_size, pool.block_size, pool.policy, pool.tokens_per_rank)
        self.device, self.dtype, self.backend = device, dtype, backend
        self.stats = CommStats()
        self.elasticity = []
        base_group = new_groups([list(range(self.tp))], rank)
        self.heads = [shard_range(self.n_heads, self.tp, r) for r in range(self.tp)]
        if self.is_base:
            model = build_model(model_cfg, dtype, "cpu")
            for block in model.blocks:
                shard_attention(block.attn, self.tp, rank, base_group, timer, self.stats)
                shard_ffn(block.ffn, self.tp, rank, base_group, timer, self.stats)
            self.embed = VocabParallelEmbedding(model.tok_emb, self.tp, rank, base_group, timer, self.stats)
            self.head = VocabParallelHead(model.lm_head, self.tp, rank, base_group, timer, self.stats)
            self.blocks, self.norm = model.blocks, model.norm
            self.modules = torch.nn.ModuleList([self.embed, self.blocks, self.norm, self.head]).to(device)
            self.local_heads = self.heads[rank][1] - self.heads[rank][0]
        else:
            self.modules = torch.nn.ModuleList()  # the pool holds no weights

    # -- placement helpers ---------------------------------------------------------------------------
    def _global(self, p: int) -> int:
        return self.tp + p

    def _node(self, p: int) -> int:
        return self._global(p) // self.gpus_per_node

    def _sources(self, s: int) -> list[int]:
        """Pool ranks whose (merged) partial for seq s reaches the base: all holders, or one leader a node."""
        holders = self.bm.participants(s)
        if not self.hierarchical:
            return holders
        return sorted({min(q for q in holders if self._node(q) == self._node(p)) for p in holders})

    def _leader(self, s: int, p: int) -> int:
        return min(q for q in self.bm.participants(s) if self._node(q) == self._node(p))

    # -- setup -----------------------------------------------------------------------------------------
    def _reset(self, lens: torch.Tensor):
        self.lens = lens.cpu().clone()  # tokens in the cache per sequence (replicated on every rank)
        self.batch = len(lens)
        self.bm = BlockManager(*self.pool_args)
        self.in_pool: set[int] = set()
        self.base_kv: dict[int, torch.Tensor] = {}  # base: seq -> [2, L, H_local, cap, D]
        self.pool_kv: dict[int, torch.Tensor] = {}  # pool: slot -> [2, L, H, block, D]
        self.step_no = 0
        self.peak_kv_bytes, self.kv_seqs = 0, []

    def _base_cache(self, s: int, cap: int) -> torch.Tensor:
        return torch.zeros(2, self.n_layers, self.local_heads, cap, self.head_dim, dtype=self.dtype, device=self.device)

    def _block(self, slot: int) -> torch.Tensor:
        if slot not in self.pool_kv:
            self.pool_kv[slot] = torch.zeros(2, self.n_layers, self.n_heads, self.block_size, self.head_dim,
                                             dtype=self.dtype, device=self.device)
        return self.pool_kv[slot]

    # -- prefill -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts, max_len):
        tokens, lens = pad_prompts(prompts, self.device)
        self._reset(lens)
        out = None
        if self.is_base:
            cap = min(max_len, self.threshold if math.isfinite(self.threshold) else max_len)
            for s in range(self.batch):
                self.base_kv[s] = self._base_cache(s, max(cap, int(lens[s])))
            step = Step(slice(0, self.batch), torch.zeros_like(lens), lens)
            x = self.embed(tokens)
            for layer, block in enumerate(self.blocks):
                q, k, v = block.attn.qkv(block.attn_norm(x), step)
                with self.timer("attention"):
                    for s in range(self.batch):
                        n = int(lens[s])
                        self.base_kv[s][0, layer, :, :n] = k[s, :, :n]
                        self.base_kv[s][1, layer, :, :n] = v[s, :, :n]
                    o, _ = attention(q, k, v, kv_lens=lens, causal=True, backend=self.backend)
                x = x + block.attn.project_out(o)
                x = x + block.ffn(block.ffn_norm(x))
            out = self._emit(last_token_logits(self.head(self.norm(x)), lens))
        with self.timer("resource_management"):
            moved = self._migrate([s for s in range(self.batch) if self.lens[s] > self.threshold])
        self._log(self.bm.allocated, moved)
        self._track()
        return out

    @torch.no_grad()
    def synthetic_prefill(self, lens, max_len, seed):
        self._reset(lens)
        gen = torch.Generator(device=self.device).manual_seed(seed + max(self.rank, 0))
        for s in range(self.batch):
            n = int(lens[s])
            if n > self.threshold:  # straight into pool blocks, no migration
                self.in_pool.add(s)
                for _, p, slot in self.bm.grow(s, n):
                    if p == self.me:
                        self._block(slot).normal_(generator=gen)
            elif self.is_base:
                cap = int(min(max_len, self.threshold))
                self.base_kv[s] = self._base_cache(s, cap)
                self.base_kv[s][:, :, :, :n].normal_(generator=gen)
        self._log(self.bm.allocated, 0)
        self._track()
        first = torch.randint(0, self.vocab_size, (self.batch,), generator=torch.Generator().manual_seed(seed))
        return first.to(self.device) if self.is_base else None

    def _migrate(self, seqs: list[int]) -> int:
        """Move the cached KV of `seqs` from the base ranks' head slices into pool blocks."""
        if not seqs:
            return 0
        plan = {s: self.bm.grow(s, int(self.lens[s])) for s in seqs}  # (block, rank, slot)
        bs = self.block_size
        moved = 0
        for p in range(self.pool_size):
            mine = [(s, j, slot) for s in seqs for j, q, slot in plan[s] if q == p]
            if not mine:
                continue
            moved += len(mine)
            for r in range(self.tp):
                h0, h1 = self.heads[r]
                shape = (len(mine), 2, self.n_layers, h1 - h0, bs, self.head_dim)
                if self.is_base and r == self.rank:
                    buf = torch.zeros(shape, dtype=self.dtype, device=self.device)
                    for i, (s, j, _) in enumerate(mine):
                        chunk = self.base_kv[s][:, :, :, j * bs : (j + 1) * bs]
                        buf[i, :, :, :, : chunk.shape[3]] = chunk
                    dist.send(buf, dst=self._global(p), tag=TAG_MIGRATE)
                    self.stats.add("migrate_to_pool", buf.nbytes)
                elif self.me == p:
                    buf = torch.empty(shape, dtype=self.dtype, device=self.device)
                    dist.recv(buf, src=r, tag=TAG_MIGRATE)
                    self.stats.add("migrate_from_base", buf.nbytes)
                    for i, (_, _, slot) in enumerate(mine):
                        self._block(slot)[:, :, h0:h1] = buf[i]
        for s in seqs:
            self.in_pool.add(s)
            self.base_kv.pop(s, None)
        self.migrated = getattr(self, "migrated", 0) + moved
        return moved

    # -- decode ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens):
        self.step_no += 1
        allocated_before = self.bm.allocated
        with self.timer("resource_management"):
            crossing = [s for s in range(self.batch) if s not in self.in_pool and self.lens[s] + 1 > self.threshold]
            moved = self._migrate(crossing)
            for s in sorted(self.in_pool):
                self.bm.grow(s, int(self.lens[s]) + 1)
        self._log(self.bm.allocated - allocated_before, moved)
        out = self._decode_base(tokens) if self.is_base else self._decode_pool()
        self.lens += 1
        self._track()
        return out

    def _track(self):
        """Peak KV bytes this rank held, and which sequences' KV it holds now."""
        kv = sum(t.nbytes for t in self.base_kv.values()) + sum(t.nbytes for t in self.pool_kv.values())
        self.peak_kv_bytes = max(self.peak_kv_bytes, kv)
        if self.is_base:
            self.kv_seqs = sorted(self.base_kv)
        else:
            self.kv_seqs = sorted(s for s in self.in_pool if self.me in self.bm.participants(s))

    def _log(self, allocated: int, migrated: int):
        self.elasticity.append({
            "step": self.step_no,
            "pool_ranks_per_seq": {str(s): self.bm.participants(s) for s in sorted(self.in_pool)},
            "blocks_allocated": allocated, "blocks_migrated": migrated, "blocks_freed": 0,
            "blocks_held": self.bm.allocated - self.bm.freed,
        })

    def _long_short(self, rows):
        long = [s for s in rows if s in self.in_pool]
        return long, [s for s in rows if s not in self.in_pool]

    def _decode_base(self, tokens):
        dev_lens = self.lens.to(self.device)
        step = Step(slice(0, self.batch), dev_lens, torch.ones_like(dev_lens))
        x = self.embed(tokens[:, None])  # [B, 1, hidden]
        mbs = micro_batches(self.batch, self.micro_batches)
        for layer, block in enumerate(self.blocks):
            pending = []
            for rows in mbs:
                pending.append(self._issue(layer, block, x, rows, step))
                if not self.async_overlap:
                    x = self._complete(layer, block, x, *pending.pop())
            for item in pending:
                x = self._complete(layer, block, x, *item)
        logits = self.head(self.norm(x))[:, 0]
        return self._emit(logits)

    def _issue(self, layer, block, x, rows, step):
        """QKV for one micro-batch; short sequences attend here; long ones go out to the pool."""
        sl = slice(rows.start, rows.stop)
        q, k, v = block.attn.qkv(block.attn_norm(x[sl]), Step(sl, step.cache_lens[sl], step.new_lens[sl]))
        long, short = self._long_short(rows)
        out = torch.zeros_like(q)  # [b, H_local, 1, D]
        if short:
            with self.timer("attention"):
                out[[s - rows.start for s in short]] = self._base_attention(layer, short, q, k, v, rows.start)
        recvs = []
        with self.timer("communication"):
            for p in range(self.pool_size):
                qs = [s for s in long if p in self.bm.participants(s)]
                if not qs:
                    continue
                tails = [s for s in long if self.bm.owner_of(s, int(self.lens[s]))[0] == p]
                msg = torch.cat([q[[s - rows.start for s in qs], :, 0], k[[s - rows.start for s in tails], :, 0],
                                 v[[s - rows.start for s in tails], :, 0]]).contiguous()
                recvs.append(dist.isend(msg, dst=self._global(p), tag=TAG_QKV))
                self.stats.add("base_to_pool", msg.nbytes)
            partials = []
            for p in range(self.pool_size):
                ss = [s for s in long if p in self._sources(s)]
                if not ss:
                    continue
                o = torch.empty(len(ss), self.local_heads, self.head_dim, dtype=self.dtype, device=self.device)
                l = torch.empty(len(ss), self.local_heads, dtype=torch.float32, device=self.device)
                recvs += [dist.irecv(o, src=self._global(p), tag=TAG_PARTIAL), dist.irecv(l, src=self._global(p), tag=TAG_PARTIAL)]
                partials.append((p, ss, o, l))
        return rows, long, out, recvs, partials

    def _complete(self, layer, block, x, rows, long, out, recvs, partials):
        """Wait for the pool, merge partials by LSE, then the output projection and FFN."""
        with self.timer("synchronization"):
            for work in recvs:
                work.wait()
        for _, _, o, l in partials:
            self.stats.add("pool_to_base", o.nbytes + l.nbytes)
        with self.timer("communication"):  # the last level of the reduction
            for s in long:
                parts = [(o[ss.index(s)], l[ss.index(s)]) for _, ss, o, l in partials if s in ss]
                merged, _ = merge_partials([a for a, _ in parts], [b for _, b in parts])
                out[s - rows.start, :, 0] = merged
        sl = slice(rows.start, rows.stop)
        h = x[sl] + block.attn.project_out(out)
        x[sl] = h + block.ffn(block.ffn_norm(h))
        return x

    def _base_attention(self, layer, seqs, q, k, v, row0):
        """Append the new token and attend over the base-held cache of short sequences."""
        idx = [s - row0 for s in seqs]
        span = max(int(self.lens[s]) + 1 for s in seqs)
        kc = torch.zeros(len(seqs), self.local_heads, span, self.head_dim, dtype=self.dtype, device=self.device)
        vc = torch.zeros_like(kc)
        for i, s in enumerate(seqs):
            n = int(self.lens[s])
            cache = self.base_kv[s]
            cache[0, layer, :, n] = k[idx[i], :, 0]
            cache[1, layer, :, n] = v[idx[i], :, 0]
            kc[i, :, : n + 1] = cache[0, layer, :, : n + 1]
            vc[i, :, : n + 1] = cache[1, layer, :, : n + 1]
        lens = torch.tensor([int(self.lens[s]) + 1 for s in seqs], device=self.device)
        return attention(q[idx], kc, vc, kv_lens=lens, backend=self.backend)[0]

    def _decode_pool(self):
        for layer in range(self.n_layers):
            for rows in micro_batches(self.batch, self.micro_batches):
                long, _ = self._long_short(rows)
                mine = [s for s in long if self.me in self.bm.participants(s)]
                if mine:
                    self._pool_attend(layer, mine, long)
        return None

    def _pool_attend(self, layer, mine, long):
        tails = [s for s in mine if self.bm.owner_of(s, int(self.lens[s]))[0] == self.me]
        q = torch.empty(len(mine), self.n_heads, self.head_dim, dtype=self.dtype, device=self.device)
        knew, vnew = torch.empty(2, len(tails), self.n_heads, self.head_dim, dtype=self.dtype, device=self.device)
        works, bufs = [], []
        with self.timer("synchronization"):  # waiting for the base's q (includes the transfer)
            for r in range(self.tp):
                h0, h1 = self.heads[r]
                buf = torch.empty(len(mine) + 2 * len(tails), h1 - h0, self.head_dim, dtype=self.dtype, device=self.device)
                works.append(dist.irecv(buf, src=r, tag=TAG_QKV))
                bufs.append((h0, h1, buf))
            for w in works:
                w.wait()
        for h0, h1, buf in bufs:
            self.stats.add("from_base", buf.nbytes)
            q[:, h0:h1] = buf[: len(mine)]
            knew[:, h0:h1] = buf[len(mine) : len(mine) + len(tails)]
            vnew[:, h0:h1] = buf[len(mine) + len(tails) :]
        bs = self.block_size
        with self.timer("attention"):
            for i, s in enumerate(tails):  # the new token goes into the sequence's last block
                _, slot = self.bm.owner_of(s, int(self.lens[s]))
                off = int(self.lens[s]) % bs
                self._block(slot)[0, layer, :, off] = knew[i]
                self._block(slot)[1, layer, :, off] = vnew[i]
            per_seq = []
            for s in mine:
                blocks = self.bm.blocks_on(s, self.me)
                total = int(self.lens[s]) + 1
                valid = sum(min(bs, total - j * bs) for j, _ in blocks)
                per_seq.append((blocks, valid))
            span = max(len(b) for b, _ in per_seq) * bs
            kc = torch.zeros(len(mine), self.n_heads, span, self.head_dim, dtype=self.dtype, device=self.device)
            vc = torch.zeros_like(kc)
            for i, (blocks, _) in enumerate(per_seq):
                for n, (_, slot) in enumerate(blocks):
                    kc[i, :, n * bs : (n + 1) * bs] = self._block(slot)[0, layer]
                    vc[i, :, n * bs : (n + 1) * bs] = self._block(slot)[1, layer]
            lens = torch.tensor([v for _, v in per_seq], device=self.device)
            out, lse = attention(q[:, :, None], kc, vc, kv_lens=lens, backend=self.backend)
            out, lse = out[:, :, 0], lse[:, :, 0]  # [n, H, D], [n, H]
        self._reduce(mine, out, lse)

    def _reduce(self, mine, out, lse):
        """Deliver this rank's partials: via the node leader (hierarchical) or straight to the base (flat)."""
        sends = []
        with self.timer("communication"):
            if self.hierarchical:
                lead = [s for s in mine if self._leader(s, self.me) == self.me]
                for p in range(self.pool_size):  # members' partials for the sequences this rank leads
                    if p == self.me:
                        continue
                    ss = [s for s in lead if p in self.bm.participants(s) and self._node(p) == self._node(self.me)]
                    if not ss:
                        continue
                    o = torch.empty(len(ss), self.n_heads, self.head_dim, dtype=self.dtype, device=self.device)
                    l = torch.empty(len(ss), self.n_heads, dtype=torch.float32, device=self.device)
                    dist.recv(o, src=self._global(p), tag=TAG_LEADER)
                    dist.recv(l, src=self._global(p), tag=TAG_LEADER)
                    self.stats.add("pool_from_pool", o.nbytes + l.nbytes)
                    for i, s in enumerate(ss):
                        k = mine.index(s)
                        out[k], lse[k] = merge_partials([out[k], o[i]], [lse[k], l[i]])
                for leader in sorted({self._leader(s, self.me) for s in mine} - {self.me}):
                    idx = [mine.index(s) for s in mine if self._leader(s, self.me) == leader]
                    o, l = out[idx].contiguous(), lse[idx].contiguous()
                    sends += [dist.isend(o, dst=self._global(leader), tag=TAG_LEADER),
                              dist.isend(l, dst=self._global(leader), tag=TAG_LEADER)]
                    self.stats.add("pool_to_pool", o.nbytes + l.nbytes)
                deliver = lead
            else:
                deliver = mine
            idx = [mine.index(s) for s in deliver]
            if idx:
                for r in range(self.tp):
                    h0, h1 = self.heads[r]
                    o, l = out[idx, h0:h1].contiguous(), lse[idx, h0:h1].contiguous()
                    sends += [dist.isend(o, dst=r, tag=TAG_PARTIAL), dist.isend(l, dst=r, tag=TAG_PARTIAL)]
                    self.stats.add("pool_to_base", o.nbytes + l.nbytes)
            for w in sends:
                w.wait()

    # -- end -----------------------------------------------------------------------------------------------
    def _emit(self, logits):
        self.logits.append(logits)
        return logits.argmax(-1)

    def finish(self):
        with self.timer("resource_management"):
            self.bm.check()
            freed = sum(self.bm.free(s) for s in sorted(self.in_pool))
            self.pool_kv.clear()
            self.base_kv.clear()
            self.bm.check()
        self.elasticity.append({"step": "finish", "pool_ranks_per_seq": {}, "blocks_allocated": 0, "blocks_migrated": 0,
                                "blocks_freed": freed, "blocks_held": self.bm.allocated - self.bm.freed})
        self.in_pool = set()

    def report(self):
        block_bytes = 2 * self.n_layers * self.n_heads * self.block_size * self.head_dim * torch.finfo(self.dtype).bits // 8
        return {"role": self.role, "weight_bytes": param_bytes(self.modules), "kv_bytes": self.peak_kv_bytes,
                "comm_bytes": dict(self.stats.bytes), "pool_block_bytes": block_bytes, "kv_seqs": self.kv_seqs,
                "blocks_allocated": self.bm.allocated, "blocks_freed": self.bm.freed}
