"""The attention pool's block table: which pool rank holds which KV block of which sequence, as numpy arrays.

It is deterministic bookkeeping, so every rank keeps an identical replica of the placement (which rank holds
each block) and computes the same plan from the same lengths: no allocation messages are needed. Slot numbers
(where in a rank's block pool a block lives) are kept only by the rank that owns them.

Policy:
- a sequence gets ranks_wanted(tokens) pool ranks (proportional: ceil(tokens / tokens_per_rank), or all),
  capped at max_ranks; it widens onto the least-loaded ranks it does not use yet, staggered so that many
  sequences placed at once spread over the pool instead of all picking the same least-loaded rank;
- a sequence placed at once (migration, synthetic KV) deals its blocks round-robin over its ranks;
- a new block of a placed sequence goes to its rank with the fewest of its blocks (ties: assignment order),
  so a rank added by widening catches up.
Every operation works on arrays of sequences at once: Python work does not grow with batch or block count.
"""
from __future__ import annotations

import numpy as np


class OutOfBlocks(RuntimeError):
    pass


class BlockTable:
    def __init__(self, batch: int, pool_size: int, max_ranks_per_seq: int, block_size: int, policy: str,
                 tokens_per_rank: int, me: int = -1, slots: int = 0, max_blocks_per_seq: int = 0):
        self.batch, self.pool_size, self.block_size = batch, pool_size, block_size
        self.max_ranks = max(1, min(max_ranks_per_seq, pool_size))
        self.policy, self.tokens_per_rank = policy, tokens_per_rank
        P = max(pool_size, 1)
        self.order = np.full((batch, P), np.iinfo(np.int32).max, np.int64)  # assignment order of rank p; max = unused
        self.n_ranks = np.zeros(batch, np.int64)  # ranks assigned per sequence
        self.counts = np.zeros((batch, P), np.int64)  # blocks of sequence s on rank p
        self.n_blocks = np.zeros(batch, np.int64)
        self.last_rank = np.full(batch, -1, np.int64)  # rank holding each sequence's last block
        self.held = np.zeros(P, np.int64)  # blocks held per rank
        self.allocated = self.freed = 0  # totals since creation
        self.version = 0  # bumped whenever the set of (sequence, rank) pairs changes
        # this rank's own slots (pool ranks only): a free stack and each sequence's local blocks in order
        self.me = me
        self.table = np.zeros((batch, max_blocks_per_seq if me >= 0 else 0), np.int32)  # local block j -> slot
        self.free_slots = np.arange(slots - 1, -1, -1, dtype=np.int32)  # popped from the end: 0, 1, 2, ...
        self.n_free = slots

    # -- queries -----------------------------------------------------------------------------------
    def ranks_wanted(self, n_tokens: np.ndarray) -> np.ndarray:
        if self.policy == "all":
            return np.full_like(n_tokens, self.max_ranks)
        return np.clip(-(-n_tokens // self.tokens_per_rank), 1, self.max_ranks)

    def participates(self) -> np.ndarray:
        """[batch, pool] bool: rank p holds at least one block of sequence s."""
        return self.counts > 0

    def local_tokens(self, n_tokens: np.ndarray) -> np.ndarray:
        """[batch, pool]: tokens of each sequence on each rank when the sequences hold n_tokens (only the last
        block is partly filled)."""
        unfilled = self.n_blocks * self.block_size - n_tokens  # [batch]
        tokens = self.counts * self.block_size
        rows = np.nonzero(self.last_rank >= 0)[0]
        tokens[rows, self.last_rank[rows]] -= unfilled[rows]
        return tokens

    # -- changes -----------------------------------------------------------------------------------
    def place(self, seqs: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
        """Sequences that hold no block yet get room for n_tokens each, dealt round-robin over their ranks.
        Returns the new blocks as rows (seq, block index, rank, index among the seq's blocks on that rank)."""
        seqs, n_tokens = np.asarray(seqs, np.int64), np.asarray(n_tokens, np.int64)
        if len(seqs) == 0:
            return np.zeros((0, 4), np.int64)
        assert not self.n_blocks[seqs].any(), "place() is for sequences with no block yet"
        self._widen(seqs, self.ranks_wanted(n_tokens))
        nb = -(-n_tokens // self.block_size)
        seq_of = np.repeat(seqs, nb)
        block = np.arange(nb.sum()) - np.repeat(np.cumsum(nb) - nb, nb)  # 0..nb-1 per sequence
        ranks_in_order = np.argsort(self.order[seqs], axis=1, kind="stable")  # [n, P] assignment order
        row = np.repeat(np.arange(len(seqs)), nb)
        rank = ranks_in_order[row, block % self.n_ranks[seq_of]]
        return self._add_blocks(seq_of, block, rank)

    def grow(self, seqs: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
        """Placed sequences get room for n_tokens (at decode: one more token, so at most one new block each)."""
        seqs, n_tokens = np.asarray(seqs, np.int64), np.asarray(n_tokens, np.int64)
        self._widen(seqs, self.ranks_wanted(n_tokens))
        new = []
        while True:  # one round per new block a sequence needs: once per step at decode
            short = self.n_blocks[seqs] * self.block_size < n_tokens
            if not short.any():
                break
            s = seqs[short]
            key = self.counts[s] * (self.pool_size + 1) + np.minimum(self.order[s], self.pool_size)
            key[self.order[s] == np.iinfo(np.int32).max] = np.iinfo(np.int64).max
            new.append(self._add_blocks(s, self.n_blocks[s], key.argmin(axis=1)))
        return np.concatenate(new) if new else np.zeros((0, 4), np.int64)

    def free(self, seqs: np.ndarray) -> int:
        seqs = np.asarray(seqs, np.int64)
        n = int(self.n_blocks[seqs].sum())
        if self.me >= 0:
            mine = self.counts[seqs, self.me]
            cols = np.arange(self.table.shape[1])
            released = self.table[seqs][cols[None, :] < mine[:, None]]
            self.free_slots[self.n_free : self.n_free + len(released)] = released[::-1]
            self.n_free += len(released)
        self.held -= self.counts[seqs].sum(axis=0)
        self.counts[seqs] = 0
        self.n_blocks[seqs] = 0
        self.last_rank[seqs] = -1
        self.order[seqs] = np.iinfo(np.int32).max
        self.n_ranks[seqs] = 0
        self.freed += n
        self.version += 1
        return n

    def slots_of(self, new: np.ndarray) -> np.ndarray:
        """Slots on this rank of the rows of `new` that this rank holds (in their order)."""
        mine = new[new[:, 2] == self.me]
        return self.table[mine[:, 0], mine[:, 3]]

    def check(self) -> None:
        """Conservation: allocated - freed = held = blocks in the table, and no slot of this rank is used twice."""
        assert self.allocated - self.freed == int(self.held.sum()) == int(self.counts.sum()) == int(self.n_blocks.sum()), \
            "blocks not conserved"
        if self.me >= 0:
            cols = np.arange(self.table.shape[1])
            used = self.table[cols[None, :] < self.counts[:, self.me][:, None]]
            assert len(np.unique(used)) == len(used), "a slot is held twice"
            assert len(used) + self.n_free == len(self.free_slots), "slots not conserved"

    # -- internals ---------------------------------------------------------------------------------
    def _widen(self, seqs: np.ndarray, want: np.ndarray) -> None:
        need = np.maximum(want - self.n_ranks[seqs], 0)
        if not need.any():
            return
        s, need = seqs[need > 0], need[need > 0]
        P = self.pool_size
        by_load = np.argsort(self.held[:P], kind="stable")
        start = np.cumsum(need) - need
        offset = (start + start // P) % P  # stagger: each request starts further along the load order, and each
        # wrap around the pool shifts by one more, so that sequences given every rank differ in their first
        pref = by_load[(offset[:, None] + np.arange(P)[None, :]) % P]  # [n, P] candidate ranks
        free = self.order[s[:, None], pref] == np.iinfo(np.int32).max
        take = free & (np.cumsum(free, axis=1) <= need[:, None])
        row, col = np.nonzero(take)
        rank = pref[row, col]
        rank_no = self.n_ranks[s][row] + np.cumsum(take, axis=1)[row, col] - 1
        self.order[s[row], rank] = rank_no
        self.n_ranks[s] += take.sum(axis=1)
        self.version += 1

    def _add_blocks(self, seq, block, rank) -> np.ndarray:
        """Record new blocks (already ordered by block within each sequence); allocate this rank's slots."""
        P = self.pool_size
        before = self.counts[seq, rank]  # local index base of each sequence on each rank
        # local index of each new block on its rank: blocks of the same (seq, rank) earlier in this call
        key = seq * P + rank
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        starts = np.r_[0, np.nonzero(np.diff(sorted_key))[0] + 1]
        run = np.arange(len(key)) - np.repeat(starts, np.diff(np.r_[starts, len(key)]))
        local = np.empty(len(key), np.int64)
        local[order] = run
        local += before
        np.add.at(self.counts, (seq, rank), 1)
        np.add.at(self.held, rank, 1)
        np.add.at(self.n_blocks, seq, 1)
        last = np.r_[seq[1:] != seq[:-1], True] if len(seq) else np.zeros(0, bool)  # last new block of each seq
        self.last_rank[seq[last]] = rank[last]
        self.allocated += len(seq)
        self.version += int(np.any(before == 0))
        rows = np.stack([seq, block, rank, local], axis=1)
        if self.me >= 0:
            mine = rows[rank == self.me]
            if len(mine) > self.n_free:
                raise OutOfBlocks(f"pool rank {self.me} has no free KV block left ({len(self.free_slots)} slots): "
                                  f"give the pool more memory (strategy.pool.kv_memory_fraction), more ranks, or a shorter workload")
            if len(mine):
                if mine[:, 3].max() >= self.table.shape[1]:
                    raise OutOfBlocks(f"a sequence needs more than {self.table.shape[1]} blocks on pool rank {self.me}")
                slots = self.free_slots[self.n_free - len(mine) : self.n_free][::-1]
                self.n_free -= len(mine)
                self.table[mine[:, 0], mine[:, 3]] = slots
        return rows

