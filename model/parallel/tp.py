"""Tensor parallelism applied from outside the model (gpt-fast style): slice the reference weights,
shrink head counts, add the all-reduce / all-gather. Used by the static strategy and the FA Pool base group.

Process groups are passed in; nothing here reads the environment.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.transformer import Attention, FeedForward

# Gather equal tensors of a group into one: torch 2.13 names it all_gather_single and deprecates
# all_gather_into_tensor (a FutureWarning per call); older torch has only the latter.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def shard_range(n: int, parts: int, index: int) -> tuple[int, int]:
    size = n // parts
    return index * size, (index + 1) * size


class CommStats:
    """Bytes and operations (messages or collectives) of this rank, by the kind of traffic."""

    def __init__(self):
        self.bytes, self.ops = {}, {}

    def add(self, key: str, nbytes: int, ops: int = 1):
        self.bytes[key] = self.bytes.get(key, 0) + int(nbytes)
        self.ops[key] = self.ops.get(key, 0) + ops

    def since(self, before: "CommStats") -> "CommStats":
        """What was added after `before` (a copy taken earlier)."""
        delta = CommStats()
        for key in self.bytes:
            n, ops = self.bytes[key] - before.bytes.get(key, 0), self.ops[key] - before.ops.get(key, 0)
            if ops:
                delta.add(key, n, ops)
        return delta

    def copy(self) -> "CommStats":
        c = CommStats()
        c.bytes, c.ops = dict(self.bytes), dict(self.ops)
        return c

    def merge(self, other: "CommStats") -> None:
        for key in other.bytes:
            self.add(key, other.bytes[key], other.ops[key])


class AllReduceAfter(nn.Module):
    """A row-parallel linear: local matmul of a slice of the input dim, then sum over the TP group."""

    def __init__(self, linear: nn.Linear, group, timer, stats: CommStats):
        super().__init__()
        self.linear, self.group, self.timer, self.stats = linear, group, timer, stats

    def forward(self, x):
        y = self.linear(x)
        if dist.get_world_size(self.group) > 1:
            with self.timer("communication"):
                dist.all_reduce(y, group=self.group)
            self.stats.add("tp_allreduce", y.nbytes)
        return y


def shard_attention(attn: Attention, tp: int, tp_rank: int, group, timer, stats) -> tuple[int, int]:
    """Keep this rank's heads: QKV column-parallel, output projection row-parallel. Returns (h0, h1)."""
    h0, h1 = shard_range(attn.n_heads, tp, tp_rank)
    d, hidden = attn.head_dim, attn.wqkv.in_features
    w = attn.wqkv.weight.detach().view(3, attn.n_heads, d, hidden)[:, h0:h1].reshape(-1, hidden)
    attn.wqkv = _linear(w)
    attn.wo = AllReduceAfter(_linear(attn.wo.weight.detach()[:, h0 * d : h1 * d]), group, timer, stats)
    attn.n_heads = h1 - h0
    return h0, h1


def shard_ffn(ffn: FeedForward, tp: int, tp_rank: int, group, timer, stats) -> None:
    """Up projection column-parallel, down projection row-parallel."""
    f0, f1 = shard_range(ffn.up.out_features, tp, tp_rank)
    ffn.up = _linear(ffn.up.weight.detach()[f0:f1])
    ffn.down = AllReduceAfter(_linear(ffn.down.weight.detach()[:, f0:f1]), group, timer, stats)


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.clone().contiguous(), requires_grad=False)
    return lin


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a slice of the vocabulary's rows; lookups outside it give 0; sum over the group."""

    def __init__(self, emb: nn.Embedding, tp: int, tp_rank: int, group, timer, stats):
        super().__init__()
        self.v0, self.v1 = shard_range(emb.num_embeddings, tp, tp_rank)
        self.weight = nn.Parameter(emb.weight.detach()[self.v0 : self.v1].clone(), requires_grad=False)
        self.group, self.timer, self.stats = group, timer, stats

    def forward(self, tokens):
        local = tokens - self.v0
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside.unsqueeze(-1)
        if dist.get_world_size(self.group) > 1:
            with self.timer("communication"):
                dist.all_reduce(x, group=self.group)
            self.stats.add("tp_allreduce", x.nbytes)
        return x


class VocabParallelHead(nn.Module):
    """LM head split over the vocabulary; logits all-gathered so that every rank sees all of them."""

    def __init__(self, head: nn.Linear, tp: int, tp_rank: int, group, timer, stats):
        super().__init__()
        v0, v1 = shard_range(head.out_features, tp, tp_rank)
        self.weight = nn.Parameter(head.weight.detach()[v0:v1].clone(), requires_grad=False)
        self.group, self.timer, self.stats = group, timer, stats

    def forward(self, x):
        local = F.linear(x, self.weight).float().contiguous()
        n = dist.get_world_size(self.group)
        if n == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(n)]
        with self.timer("communication"):
            dist.all_gather(parts, local, group=self.group)
        self.stats.add("tp_allgather", local.nbytes * (n - 1))
        return torch.cat(parts, dim=-1)


def new_groups(rank_lists: list[list[int]], my_rank: int):
    """Create one group per list (every rank must call this with the same lists); return mine."""
    mine = None
    for ranks in rank_lists:
        g = dist.new_group(ranks)
        if my_rank in ranks:
            mine = g
    return mine
