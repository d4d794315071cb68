"""KV storage in fixed-size blocks: one preallocated tensor per rank, indexed by slot, never copied whole.

    kv: [layers, 2 (k, v), slots, heads, block, head_dim]
A layer's K (or V) is the view kv[layer, 0] of shape [slots, heads, block, head_dim], which is what
model/paged_attention.py reads through a block table. Writing a new token, moving blocks out (migration to
the pool) and in are each one indexed kernel, whatever the number of sequences or blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_blocks(x: torch.Tensor, block: int, n_blocks: int | None = None) -> torch.Tensor:
    """[b, h, T, D] -> [b, h, n_blocks, block, D]: token t in block t // block, zero-padded (or cut) to n_blocks
    whole blocks (default: as many as T needs)."""
    b, h, t, d = x.shape
    n = -(-t // block) if n_blocks is None else n_blocks
    return F.pad(x[:, :, : n * block], (0, 0, 0, n * block - min(t, n * block))).view(b, h, n, block, d)


class PagedKV:
    def __init__(self, layers: int, slots: int, heads: int, block_size: int, head_dim: int, dtype, device):
        self.kv = torch.zeros(layers, 2, slots, heads, block_size, head_dim, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def slots(self) -> int:
        return self.kv.shape[2]

    def nbytes(self) -> int:
        return self.kv.nbytes

    def block_bytes(self) -> int:
        return self.kv[:, :, 0].nbytes

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of one layer, each [slots, heads, block, head_dim]."""
        return self.kv[layer, 0], self.kv[layer, 1]

    def write_token(self, layer: int, slots: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [n, heads, head_dim] go to (slots[i], offsets[i]) of this layer."""
        # index_put_ rather than item assignment, which adds a view when n == 1: same ops for every n
        self.kv[layer, 0].transpose(1, 2).index_put_((slots, offsets), k)  # [slots, block, heads, D] view
        self.kv[layer, 1].transpose(1, 2).index_put_((slots, offsets), v)

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor, first_slots: torch.Tensor, n_blocks: int):
        """Prompt K/V [b, heads, T, head_dim]: row i's tokens into slots first_slots[i] + j for j < n_blocks (as
        many tokens as fit), one indexed copy per tensor whatever b and n_blocks are."""
        b, heads, _, dim = k.shape
        slots = (first_slots[:, None] + torch.arange(n_blocks, device=k.device)).reshape(-1)
        for i, src in enumerate((k, v)):
            blocks = to_blocks(src, self.block_size, n_blocks).transpose(1, 2).reshape(b * n_blocks, heads, -1, dim)
            self.kv[layer, i].index_copy_(0, slots, blocks)

    def dense(self, layer: int, slots: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first `upto` tokens held in blocks `slots` [b, blocks] (in order), gathered into
        [b, heads, upto, head_dim]: the keys a prefill chunk attends over."""
        return tuple(cache[slots].transpose(1, 2).flatten(2, 3)[:, :, :upto] for cache in self.layer(layer))

    def read_blocks(self, slots: torch.Tensor) -> torch.Tensor:
        """[layers, 2, n, heads, block, head_dim]: the blocks at `slots`, all layers (what a migration sends)."""
        return self.kv.index_select(2, slots)

    def write_blocks(self, slots: torch.Tensor, blocks: torch.Tensor, heads: slice = slice(None)):
        """Store [layers, 2, n, h, block, head_dim] at `slots`, into the head range `heads` (a base rank's shard)."""
        self.kv[:, :, slots, heads] = blocks

    def fill_random(self, gen: torch.Generator):
        """Random K/V in every block (synthetic KV workloads), in place."""
        self.kv.normal_(generator=gen)
