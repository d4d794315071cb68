"""Decode context parallelism (DCP): tensor parallelism whose attention also shards every sequence's KV.

A stage's TP group of t ranks splits into t / k KV-shard groups of k consecutive ranks (k = strategy.kv_shards).
Weights are sliced over all t ranks exactly as in static TP (model/parallel/static.py); only attention differs:
- a KV-shard group owns the heads of its k ranks (k * H / t heads), and each of its ranks holds those heads for
  1/k of every sequence's tokens: round-robin by KV blocks, global block g on shard g % k as its local block
  g // k. A shard's tokens are a dense prefix of its own cache, so decode is the paged kernel over local lengths.
- per layer, each rank all-gathers its heads' q, k, v within the KV-shard group (one collective), the shard that
  owns the new token's block stores it (the others write into a spare block), and every rank computes the partial
  attention of the group's heads over its tokens: out in fp32 and its log-sum-exp.
- one all-to-all in the group sends each rank the partials of its own heads from the k shards, merged by LSE;
  the output projection and the FFN then run as in TP.
With k = 1 this is TP; with k = t every rank holds every head for 1/t of the tokens (vLLM's DCP = TP case).

For this model (MHA, 32 KV heads) plain TP already holds 1/t of the KV per rank without duplication, so DCP's
KV per rank equals TP's and the gather and all-to-all are extra traffic: DCP pays where a model has fewer KV
heads than the TP degree (GQA, MLA), which would otherwise be replicated. What it measures here is that cost.

Prefill runs the same way, chunk by chunk (strategy.prefill_chunk): a chunk's partial attention on each shard
covers the shard's cached blocks before the chunk (no mask), and on one shard of the group the chunk's own keys
(causal over the chunk, which the gather gives every rank whole).
The decode step, collectives included, is captured in CUDA graphs by the static engine's machinery.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.attention import attention, masked_attention, merge_pair, merge_partials
from model.paged_attention import STATIC_BATCH_BACKEND, paged_decode
from model.parallel.paged_kv import to_blocks
from model.parallel.serving_kv import ServingKV
from model.parallel.static import StageKV, StaticEngine
from model.parallel.tp import all_gather_single, new_groups
from model.transformer import Step


def shard_lengths(lens: torch.Tensor, shard: int, shards: int, block: int) -> torch.Tensor:
    """Tokens of sequences of `lens` tokens that shard `shard` of `shards` holds (round-robin by blocks)."""
    full, rest = lens // block, lens % block
    mine = (full - shard + shards - 1) // shards  # whole blocks g < full with g % shards == shard
    return mine * block + torch.where(full % shards == shard, rest, torch.zeros_like(rest))


def shard_length(n: int, shard: int, shards: int, block: int) -> int:
    """shard_lengths for one length known on the host (a prefill chunk's end)."""
    full, rest = divmod(n, block)
    return (full - shard + shards - 1) // shards * block + (rest if full % shards == shard else 0)


class ShardedAttention:
    """A block's attention core on a DCP rank: gather the group's q, k, v; store the shard's tokens; partial
    attention over them; all-to-all the partials to the ranks that own their heads and merge."""

    def __init__(self, cache: StageKV, layer: int, shard: int, shards: int, group, backend: str, timer, stats):
        self.cache, self.layer, self.shard, self.shards = cache, layer, shard, shards
        self.group, self.backend, self.timer, self.stats = group, backend, timer, stats

    def nbytes(self) -> int:
        return self.cache.layer_bytes(self.layer)

    def __call__(self, q, k, v, step: Step):  # q, k, v: [b, h, T, D], this rank's h heads
        heads = q.shape[1]
        qg, kg, vg = self._gather(torch.stack((q, k, v)))  # each [b, shards * h, T, D], the group's heads
        with self.timer("attention"):
            out, lse = self._prefill(qg, kg, vg, step) if step.prefill else self._decode(qg, kg, vg, step)
        return self._merge(out, lse, heads).to(q.dtype)

    # -- the group's q, k, v: one all-gather ------------------------------------------------------------------
    def _gather(self, qkv: torch.Tensor):
        if self.shards == 1:
            return qkv
        three, b, h, t, d = qkv.shape
        gathered = qkv.new_empty(self.shards * three, b, h, t, d)  # the shards' stacks one after the other
        with self.timer("communication"):
            all_gather_single(gathered, qkv.contiguous(), group=self.group)
        self.stats.add("dcp_allgather", qkv.nbytes * (self.shards - 1))
        # [shards, 3, b, h, T, D] -> [3, b, shards * h, T, D]: the group's heads in rank order
        return gathered.view(self.shards, three, b, h, t, d).permute(1, 2, 0, 3, 4, 5).reshape(three, b, self.shards * h, t, d)

    # -- partial attention over this shard's tokens ------------------------------------------------------------
    def _decode(self, q, k, v, step: Step):
        c, bs = self.cache, self.cache.block_size
        rows = torch.arange(step.rows.start, step.rows.stop, device=q.device)
        pos = step.cache_lens  # the new token's global position
        block = pos // bs
        local = torch.where(block % self.shards == self.shard, block // self.shards * bs + pos % bs, c.spare_position)
        c.write_token(self.layer, rows, local, k[:, :, 0], v[:, :, 0])
        lens = shard_lengths(pos + 1, self.shard, self.shards, bs).to(torch.int32)
        out, lse = paged_decode(q[:, :, 0], *c.paged[self.layer], c.table[step.rows], lens,
                                backend=STATIC_BATCH_BACKEND)
        return out[:, :, None], lse[:, :, None]  # fp32

    def _prefill(self, q, k, v, step: Step):
        """A chunk of t tokens at positions step.start + i (step.start a multiple of the block): store this shard's
        blocks of it, then the partial attention over a disjoint share of the keys: this shard's cached keys
        before the chunk (visible to every query: the fused unmasked kernel), and on one shard of the group, the
        chunk's own keys (every rank has them all after the gather: square causal, no mask when every row fills
        the chunk). The shard that takes the chunk moves from chunk to chunk; the partials merge by LSE."""
        c, bs, n = self.cache, self.cache.block_size, self.shards
        t = k.shape[2]
        first_block = step.start // bs
        chunk_blocks = -(-t // bs)
        own = (self.shard - first_block) % n  # the chunk's first block on this shard, then every n-th
        if own < chunk_blocks:
            kb, vb = (to_blocks(x, bs)[:, :, own::n].flatten(2, 3) for x in (k, v))
            c.write_chunk(self.layer, step.rows, (first_block + own) // n * bs, kb, vb)
        before = shard_length(step.start, self.shard, n, bs)
        partials = []
        if before:
            keys, values = c.dense(self.layer, step.rows, before)
            partials.append(attention(q, keys, values, backend=self.backend))
        if (step.start // t) % n == self.shard:  # every rank of the group knows start and t: one agrees
            partials.append(attention(q, k, v, kv_lens=None if step.full else step.new_lens, causal=True,
                                      backend=self.backend))
        if not partials:  # neither: no key of this chunk's queries here
            return torch.zeros_like(q, dtype=torch.float32), torch.full(q.shape[:3], float("-inf"), device=q.device)
        out, lse = partials[0] if len(partials) == 1 else merge_pair(*partials)
        return out.float(), lse

    # -- each rank's heads back from every shard: one all-to-all, merged by LSE ---------------------------------
    def _merge(self, out: torch.Tensor, lse: torch.Tensor, heads: int) -> torch.Tensor:
        if self.shards == 1:
            return out
        b, _, t, d = out.shape
        packed = torch.cat((out, lse[..., None]), dim=-1)  # [b, shards * h, T, D + 1]: one message per peer
        send = packed.view(b, self.shards, heads, t, d + 1).transpose(0, 1).contiguous()  # [shards, b, h, T, D+1]
        recv = torch.empty_like(send)
        with self.timer("communication"):
            dist.all_to_all_single(recv, send, group=self.group)
        self.stats.add("dcp_alltoall", send.nbytes * (self.shards - 1) // self.shards)
        return merge_partials(recv[..., :d], recv[..., d])[0]  # [b, h, T, D]


class ShardedServingAttention(ShardedAttention):
    """ShardedAttention for a changing batch (model/parallel/serving_kv.py): the shard's blocks of every request are
    its local blocks g // shards of global blocks g = pos // block with g % shards == shard, through one block
    table. Decode: the paged kernel over the shard's tokens. A prefill chunk: the chunk's shard tokens are stored
    first, then its queries attend over every local key with a mask by the keys' global positions (causal, and
    within the row's length), so that the shards' partials are disjoint and merge exactly."""

    def __init__(self, kv: ServingKV, layer: int, shard: int, shards: int, group, backend: str, timer, stats):
        super().__init__(None, layer, shard, shards, group, backend, timer, stats)
        self.kv = kv

    def nbytes(self) -> int:
        return self.kv.nbytes() // self.kv.store.kv.shape[0]

    def __call__(self, q, k, v, step: Step):
        heads, p, bs = q.shape[1], self.kv.current, self.kv.block_size
        qg, kg, vg = self._gather(torch.stack((q, k, v)))
        with self.timer("attention"):
            self.kv.write(self.layer, p, kg, vg, self.shard, self.shards)
            table = self.kv.pass_table(p)
            if not p.prefill:
                lens, plan = self.kv.decode_plan(p, lambda p: shard_lengths(p.start + 1, self.shard, self.shards, bs),
                                                 qg.shape[1])
                out, lse = paged_decode(qg[:, :, 0], *self.kv.store.layer(self.layer), table, lens, plan=plan,
                                        build=False)
                out, lse = out[:, :, None], lse[:, :, None]
            else:
                out, lse = self._chunk(qg, table, p)
        return self._merge(out.float(), lse, heads).to(q.dtype)

    def _chunk(self, q, table, p):
        bs, local = self.kv.block_size, shard_length(p.upto, self.shard, self.shards, self.kv.block_size)
        if local == 0:  # no key of this step's rows on this shard yet
            return torch.zeros_like(q, dtype=torch.float32), torch.full(q.shape[:3], float("-inf"), device=q.device)
        keys, values = self.kv.store.dense(self.layer, table[:, : -(-local // bs)].long(), local)
        j = torch.arange(local, device=q.device)
        key_pos = ((j // bs) * self.shards + self.shard) * bs + j % bs  # [Tk] global positions of the local keys
        query_pos = p.start[:, None] + torch.arange(q.shape[2], device=q.device)  # [b, T]
        mask = (key_pos <= query_pos[:, :, None]) & (key_pos < (p.start + p.lens)[:, None, None])
        return masked_attention(q, keys, values, mask[:, None], self.backend)


class DCPEngine(StaticEngine):
    """Static TP x PP with sharded-KV attention inside each TP group (see the module docstring)."""

    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        super().__init__(model_cfg, strategy, rank, world, device, dtype, backend, timer)
        tp, k = strategy.tp, strategy.kv_shards
        self.shards, self.shard = k, self.tp_rank % k
        self.shard_group = new_groups([[s * tp + g * k + i for i in range(k)] for s in range(strategy.pp)
                                       for g in range(tp // k)], rank)

    def _new_cache(self, batch: int, max_len: int) -> StageKV:
        attn = self.blocks[0].attn
        blocks = -(-max_len // self.kv_block)
        local_len = -(-blocks // self.shards) * self.kv_block  # this shard's blocks of the longest sequence
        return StageKV(self.per_stage, batch, attn.n_heads * self.shards, local_len, attn.head_dim, self.kv_block,
                       self.dtype, self.device, spare=True)

    def _new_core(self, layer: int):
        return ShardedAttention(self.cache, layer, self.shard, self.shards, self.shard_group, self.backend,
                                self.timer, self.stats)

    @property
    def kv_heads_factor(self) -> int:
        return self.shards

    def serve_block_tokens(self, block_size: int) -> int:
        return block_size * self.shards  # one block on each shard

    def _serving_core(self, layer: int):
        return ShardedServingAttention(self.serving, layer, self.shard, self.shards, self.shard_group, self.backend,
                                       self.timer, self.stats)

    def report(self):
        return {**super().report(), "kv_shards": self.shards, "kv_shard": self.shard}
