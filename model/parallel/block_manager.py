"""The attention pool's block table: which pool rank holds which KV block of which sequence.

It is pure bookkeeping and deterministic, so every rank keeps an identical replica and computes the same
plan from the same sequence lengths: no allocation messages are needed, and each pool rank materializes
only the blocks the table gives it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SeqBlocks:
    blocks: list = field(default_factory=list)  # block j (tokens j*bs .. j*bs+bs-1) -> (pool rank, slot)
    ranks: list = field(default_factory=list)  # pool ranks assigned to this sequence, in assignment order


class BlockManager:
    def __init__(self, pool_size: int, max_ranks_per_seq: int, block_size: int, policy: str, tokens_per_rank: int):
        self.pool_size, self.block_size = pool_size, block_size
        self.max_ranks = min(max_ranks_per_seq, pool_size)
        self.policy, self.tokens_per_rank = policy, tokens_per_rank
        self.seqs: dict[int, SeqBlocks] = {}
        self.free_slots = [[] for _ in range(pool_size)]  # freed slots are reused first
        self.next_slot = [0] * pool_size
        self.held = [0] * pool_size  # blocks held per pool rank
        self.allocated = self.freed = 0  # totals since creation

    def ranks_wanted(self, n_tokens: int) -> int:
        """Pool ranks a sequence of n_tokens gets (the allocation policy)."""
        if self.policy == "all":
            return self.max_ranks
        return max(1, min(self.max_ranks, math.ceil(n_tokens / self.tokens_per_rank)))

    def _alloc_slot(self, rank: int) -> int:
        slot = self.free_slots[rank].pop() if self.free_slots[rank] else self.next_slot[rank]
        if slot == self.next_slot[rank]:
            self.next_slot[rank] += 1
        self.held[rank] += 1
        self.allocated += 1
        return slot

    def grow(self, seq: int, n_tokens: int) -> list[tuple[int, int, int]]:
        """Make room for n_tokens of `seq`; returns the new blocks as (block index, rank, slot)."""
        sb = self.seqs.setdefault(seq, SeqBlocks())
        want = self.ranks_wanted(n_tokens)
        while len(sb.ranks) < want:  # widen onto the least-loaded ranks not yet used
            candidates = [r for r in range(self.pool_size) if r not in sb.ranks]
            sb.ranks.append(min(candidates, key=lambda r: (self.held[r], r)))
        new = []
        while len(sb.blocks) * self.block_size < n_tokens:
            per_rank = {r: 0 for r in sb.ranks}
            for r, _ in sb.blocks:
                per_rank[r] = per_rank.get(r, 0) + 1
            # fewest blocks of this sequence first, then the least-loaded rank overall
            rank = min(sb.ranks, key=lambda r: (per_rank[r], self.held[r], sb.ranks.index(r)))
            slot = self._alloc_slot(rank)
            sb.blocks.append((rank, slot))
            new.append((len(sb.blocks) - 1, rank, slot))
        return new

    def free(self, seq: int) -> int:
        sb = self.seqs.pop(seq, None)
        if sb is None:
            return 0
        for rank, slot in sb.blocks:
            self.free_slots[rank].append(slot)
            self.held[rank] -= 1
        self.freed += len(sb.blocks)
        return len(sb.blocks)

    def participants(self, seq: int) -> list[int]:
        """Pool ranks holding at least one block of seq, sorted."""
        return sorted({r for r, _ in self.seqs[seq].blocks})

    def owner_of(self, seq: int, position: int) -> tuple[int, int]:
        return self.seqs[seq].blocks[position // self.block_size]

    def blocks_on(self, seq: int, rank: int) -> list[tuple[int, int]]:
        """(block index, slot) of seq's blocks that `rank` holds, in block order."""
        return [(j, s) for j, (r, s) in enumerate(self.seqs[seq].blocks) if r == rank]

    def check(self) -> None:
        """Conservation: allocated - freed = held, and no (rank, slot) is held twice."""
        seen = set()
        for sb in self.seqs.values():
            for key in sb.blocks:
                assert key not in seen, f"block {key} held twice"
                seen.add(key)
        assert self.allocated - self.freed == len(seen) == sum(self.held), "blocks not conserved"
