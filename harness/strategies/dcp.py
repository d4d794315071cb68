"""Decode context parallelism (model/parallel/dcp.py): static TP x PP whose TP group splits into KV-shard groups
of k ranks; each shard holds 1/k of every sequence's tokens for k times the heads, and a layer's attention
gathers the group's q, k, v and merges the shards' fp32 partials by their LSE."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness.costs import collective_s
from harness.fields import at_least, need
from harness.strategies.spec import register
from harness.strategies.static import StaticConfig, StaticSpec


@dataclass
class DCPConfig(StaticConfig):
    name: str = "dcp"
    kind: str = "dcp"
    kv_shards: int = 1  # ranks of a TP group that split every sequence's KV (divides tp; 1 = plain TP)

    KIND: ClassVar[str] = "dcp"

    def __post_init__(self):
        at_least("strategy", self, 1, "kv_shards")
        need(self.tp % self.kv_shards == 0,
             f"strategy.kv_shards={self.kv_shards} does not divide strategy.tp={self.tp}: KV-shard groups split the TP group")
        super().__post_init__()


class DCPSpec(StaticSpec):
    kind = "dcp"
    config = DCPConfig

    def kv_shards(self, s) -> int:
        return s.kv_shards

    def spare_kv_tokens(self, s) -> int:
        return s.kv_shards * s.kv_block  # a spare block per sequence and shard

    def build_engine(self, cfg, rank, world, device, dtype, timer):
        from model.parallel.dcp import DCPEngine

        return DCPEngine(cfg.model, cfg.strategy, rank, world, device, dtype, cfg.attention_backend, timer)

    def exchange_s(self, cal, links, s, m, rows, b, cross, graphed, merge=True) -> float:
        """Per layer and micro-batch: the all-gather of this rank's q, k, v in its KV-shard group of k, the
        all-to-all of fp32 partials + LSE (each peer's heads) and the LSE merge. Its attention reads the same bytes
        as TP's (k x the heads, 1/k of the tokens), so that term is TP's."""
        k = s.kv_shards
        if k == 1:
            return 0.0
        heads_bytes = rows * m.hidden // s.tp  # this rank's heads x head_dim, per element size
        gather = collective_s(cal, links, "all_gather", k, heads_bytes * 3 * b, cross, graphed)
        partials = collective_s(cal, links, "all_to_all", k, heads_bytes * 4 + rows * m.n_heads // s.tp * 4, cross, graphed)
        return gather + partials + (cal.merge_s if merge else 0.0)

    def add_prefill_exchange(self, layer, eager, copy_s, s, tokens, h, d, b, cross) -> float:
        """The group's q, k, v gathered; the fp32 partials (and LSE) of the group's heads exchanged: each peer
        gets one rank's heads (NCCL's all-to-all is timed by the bytes to and from each peer); the copies around
        both (exchange_copy_bytes)."""
        k, tp = s.kv_shards, s.tp
        if k > 1:
            layer += eager("all_gather", k, 3 * tokens * h // tp * b, cross)
            layer += eager("all_to_all", k, tokens * (h // tp) * (d + 1) // d * 4, cross)
            layer += copy_s(self.exchange_copy_bytes(s, tokens, h, b))
        return layer

    def serving_prefill_masked(self, rows: int) -> bool:
        """A DCP shard's serving prefill pass attends through one mask of its keys' global positions at any row
        count (model/parallel/dcp.ShardedServingAttention)."""
        return True

    def exchange_copy_bytes(self, s, tokens, h, b) -> float:
        """Bytes a DCP rank reads and writes per prefill chunk and layer in copies that TP's attention does not make
        (model/parallel/dcp.ShardedAttention), in units of one of its own q, k, v (tokens x h / tp elements):
        - the gather: q, k, v stacked into one send buffer (3 read, 3 written), the gathered shards reordered into
          the group's head order (3k, 3k);
        - the chunk's K and V: padded to whole blocks over the group's heads (2k, 2k), this shard's blocks picked
          out (2, 2), as TP then stores them;
        - on the shard that takes the chunk's own keys, the merge of its two partials runs over k times TP's heads
          (2(k-1) read, k-1 written);
        - the partials: converted to fp32 (k read, 2k written), packed with the LSE (2k, 2k), ordered by destination
          (2k, 2k); after the all-to-all, the k partials of its heads weighted (2k, 2k) and summed (2k, 2) in fp32
          (the unfused merge), and the result cast back (2, 1)."""
        k = s.kv_shards
        one = tokens * h // s.tp * b
        gather = 6 + 6 * k
        cache_write = 4 * k + 4
        own_merge = 3 * (k - 1)
        partials = 3 * k + 4 * k + 4 * k + 4 * k + (2 * k + 2) + 3
        return one * (gather + cache_write + own_merge + partials)


register(DCPSpec())
