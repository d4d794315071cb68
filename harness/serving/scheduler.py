"""Continuous batching at the iteration level (as vLLM's and Sarathi's schedulers): who runs in the next step.

Each step the scheduler
1. releases the requests that have arrived (trace time, or a closed loop's free places) into a FCFS queue,
2. gives every running request past its prefill one decode token, allocating a KV block where its next token
   starts one,
3. spends the rest of the step's token budget on prefill chunks: first the requests already prefilling, then
   new ones admitted from the head of the queue while a batch slot and the KV allow,
and after the step retires finished requests and frees their blocks at once.

State is plain data: numpy arrays indexed by batch slot (the engine's rows) and by request, free lists as numpy
stacks. A step's host work is a few vectorized operations over the running slots plus a loop over the step's
prefill rows; the waiting queue is touched only at its head, so it costs the same with 10 or 10,000 waiting.

When the KV runs out, `on_kv_full` names what happens:
- `reserve` (admission control): a request is admitted only when blocks for its whole context (prompt + output)
  are free; it holds them until it finishes, so nothing is ever preempted.
- `preempt` (vLLM's recompute): blocks are taken as tokens need them and a request is admitted once its prompt's
  blocks are free; when a decode token needs a block and none is free, the latest-admitted request is preempted:
  its blocks go back, it returns to the head of the queue and later prefills its prompt plus the tokens it had
  generated (kept, not regenerated), then goes on.
A request whose context can never fit (more than a slot's blocks or the whole pool) is refused and counted.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from harness.config import ServingConfig
from harness.traces import Requests

@dataclass
class PoolPlacement:
    """FA Pool's placement (model/parallel/fa_pool_serving.py): a request whose context passes `threshold` tokens
    holds all its KV on the pool's `ranks`, `blocks_per_rank` blocks on one pool rank before the next (the
    proportional policy: ranks in use grow with the context; 0: round robin over every pool rank). A request
    prefilled past the threshold goes to the pool at admission; one that crosses it while decoding migrates there."""

    threshold: int
    ranks: int
    blocks_per_rank: int = 0


@dataclass
class Emission:
    """A launched step's effect, between `Scheduler.advance` and `Scheduler.stamp`: which requests emit a token
    (and where it goes in the flat token array), which finish, and the schedule's state after the step."""

    prefill_rows: int
    prefill_last: np.ndarray  # bool per prefill row: it emits
    reqs: np.ndarray  # emitting requests, prefill rows' first
    at: np.ndarray  # their token's index in Scheduler.out_tokens
    gap_reqs: np.ndarray  # requests whose token follows an earlier one (an inter-token gap)
    finished: np.ndarray
    state: dict  # the step log's columns known at advance


@dataclass
class StepPlan:
    """One step: prefill rows (a chunk of a prompt each), then decode rows (one token each), the block-table
    entries allocated for it, and (FA Pool) which rows attend in the pool and which blocks migrate there first.
    Arrays, one entry per row."""

    index: int
    prefill_slots: np.ndarray
    prefill_start: np.ndarray  # the chunk's first position (tokens already in the KV)
    prefill_len: np.ndarray
    prefill_last: np.ndarray  # bool: the chunk ends the (recomputed) prompt, so the row emits a token
    prefill_tokens: np.ndarray  # [P, longest chunk] token ids, zero-padded
    decode_slots: np.ndarray
    decode_pos: np.ndarray  # where the input token goes (tokens already in the KV)
    decode_tokens: np.ndarray  # each row's input: its last generated token
    table_updates: np.ndarray  # [U, 3]: (slot, block index in the row, block id)
    prefill_pooled: np.ndarray = None  # bool per prefill row: its KV is in the pool
    decode_pooled: np.ndarray = None
    migrations: np.ndarray = None  # [M, 2]: (base block id, pool block id) copied before the step's passes
    # int [pool ranks]: the most blocks one pooled row of the pass holds on each pool rank (0: the rank is not used)
    prefill_pool_blocks: np.ndarray = None
    decode_pool_blocks: np.ndarray = None
    # bool [pool ranks]: the ranks that store a new token of the pass's pooled rows (only they get keys and values)
    prefill_pool_writes: np.ndarray = None
    decode_pool_writes: np.ndarray = None

    @property
    def rows(self) -> int:
        return len(self.prefill_slots) + len(self.decode_slots)

    @property
    def tokens(self) -> int:
        return int(self.prefill_len.sum()) + len(self.decode_slots)


def blocks_for(tokens, block_size: int):
    return -(-tokens // block_size)


class BlockSpaces:
    """Free lists of block ids in consecutive ranges, one per space (FA Pool: the base's, then each pool rank's;
    otherwise one), as numpy stacks, and blocks promised to admitted requests per tier (0: base, 1: pool)."""

    def __init__(self, sizes: list[int]):
        self.size = np.asarray(sizes, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.size)[:-1]]).astype(np.int64)
        self.stacks = [np.arange(f, f + n, dtype=np.int64)[::-1].copy() for f, n in zip(self.first, self.size)]
        self.n_free = self.size.copy()
        self.promised = np.zeros(2, dtype=np.int64)

    @property
    def total(self) -> int:
        return int(self.size.sum())

    def free(self, tier: int) -> int:
        return int(self.n_free[0] if tier == 0 else self.n_free[1:].sum())

    def capacity(self, tier: int) -> int:
        return int(self.size[0] if tier == 0 else self.size[1:].sum())

    def take(self, space: int, k: int) -> np.ndarray:
        self.n_free[space] -= k
        n = self.n_free[space]
        return self.stacks[space][n: n + k].copy()

    def space_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first, ids, side="right") - 1

    def give(self, ids: np.ndarray) -> None:
        if len(self.size) == 1:
            spaces, groups = [0], [ids]
        else:
            of = self.space_of(ids)
            spaces = np.unique(of)
            groups = [ids[of == sp] for sp in spaces]
        for sp, g in zip(spaces, groups):
            n = self.n_free[sp]
            self.stacks[sp][n: n + len(g)] = g
            self.n_free[sp] += len(g)

    def free_ids(self) -> np.ndarray:
        return np.concatenate([st[:n] for st, n in zip(self.stacks, self.n_free)])


class Scheduler:
    """Continuous batching over a trace's requests; see the module docstring. `prompt(r)` gives request r's prompt
    token ids (called once, at its first admission). `placement`: FA Pool's, with the pool ranks' blocks as
    `pool_blocks` blocks per pool rank after the base's `kv_blocks`."""

    def __init__(self, requests: Requests, cfg: ServingConfig, kv_blocks: int, max_blocks_per_slot: int,
                 prompt, closed_concurrency: int = 0, block_tokens: int | None = None,
                 placement: PoolPlacement | None = None, pool_blocks: int = 0):
        self.req, self.cfg, self.prompt = requests, cfg, prompt
        n, slots = len(requests), cfg.max_batch
        self.bs = block_tokens or cfg.block_size  # a request's tokens per block (the engine's: DCP spans its shards)
        self.width, self.closed = max_blocks_per_slot, closed_concurrency
        self.budget_cap = cfg.prefill_chunk or cfg.token_budget
        self.placement = placement
        self.pool_ranks = placement.ranks if placement else 0
        self.kv = BlockSpaces([kv_blocks] + [pool_blocks] * self.pool_ranks)
        self.kv_blocks = self.kv.total
        self.free_slots = list(range(slots - 1, -1, -1))
        self.table = np.zeros((slots, max_blocks_per_slot), dtype=np.int64)  # host copy of the engine's block table
        # per slot (-1: free)
        self.slot_req = np.full(slots, -1, dtype=np.int64)
        self.held = np.zeros(slots, dtype=np.int64)  # blocks held
        self.ctx = np.zeros(slots, dtype=np.int64)  # tokens in the KV
        self.target = np.zeros(slots, dtype=np.int64)  # tokens to prefill (prompt, plus generated after a preemption)
        self.admit_seq = np.zeros(slots, dtype=np.int64)  # admission order, for FCFS chunks and preemption victims
        self.pooled = np.zeros(slots, dtype=bool)  # FA Pool: the slot's KV is in the pool
        self.first_rank = np.zeros(slots, dtype=np.int64)  # FA Pool: the pool rank its first pool block went to
        self.rank_blocks = np.zeros((slots, max(self.pool_ranks, 1)), dtype=np.int64)  # pool blocks per pool rank
        self.promise = np.zeros((slots, 2), dtype=np.int64)  # `reserve`: blocks promised, not yet taken, per tier
        self.seq = 0
        # per request
        self.arrival = np.full(n, np.nan)  # when it joined the queue (the replay's clock)
        self.admitted = np.full(n, np.nan)
        self.first_token = np.full(n, np.nan)
        self.last_token = np.full(n, np.nan)
        self.finished = np.full(n, np.nan)
        self.generated = np.zeros(n, dtype=np.int64)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.migrated = np.zeros(n, dtype=bool)
        self.refused = np.zeros(n, dtype=bool)
        self.offset = np.concatenate([[0], np.cumsum(requests.output_len)[:-1]]).astype(np.int64)
        self.out_tokens = np.zeros(int(requests.output_len.sum()), dtype=np.int64)  # every request's tokens, flat
        self.prompts: dict[int, np.ndarray] = {}  # prompt ids of requests admitted and not finished
        self.waiting: deque[int] = deque()
        self.next_arrival, self.steps = 0, 0
        self.itl: list[np.ndarray] = []  # per step, the inter-token gaps of its decode tokens
        self.log = {k: [] for k in ("step", "start", "end", "running", "waiting", "blocks_used", "prefill_tokens",
                                    "decode_rows", "preempted", "pool_rows", "pool_blocks_used", "pool_ranks_used",
                                    "migrated", "host_ms", "replayed")}
        self._preempted_now = self._migrated_now = 0

    @property
    def n_free(self) -> int:
        return int(self.kv.n_free.sum())

    # -- state --------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return int((self.slot_req >= 0).sum())

    def done(self) -> bool:
        return self.next_arrival >= len(self.req) and not self.waiting and self.running == 0

    def next_arrival_time(self, now: float = 0.0) -> float | None:
        """Trace time of the next request not yet released (None: all released); a closed loop's next one is due
        now (its place was freed by a refusal)."""
        if self.next_arrival >= len(self.req):
            return None
        return now if self.closed else float(self.req.arrival_s[self.next_arrival])

    def release(self, now: float, stamp: float | None = None) -> None:
        """Requests that have arrived by `now` (trace seconds) join the queue. Their arrival is stamped `stamp` (the
        replay's clock now), or where None their own trace time (a wall-clock replay, where the two clocks agree).
        A closed loop releases requests while fewer than its concurrency are in the system."""
        if self.closed:
            in_system = len(self.waiting) + self.running
            while in_system < self.closed and self.next_arrival < len(self.req):
                self._join(self.next_arrival, now if stamp is None else stamp)
                self.next_arrival += 1
                in_system += 1
            return
        arrival = self.req.arrival_s
        end = int(np.searchsorted(arrival, now, side="right"))
        for r in range(self.next_arrival, end):
            self._join(r, arrival[r] if stamp is None else stamp)
        self.next_arrival = max(end, self.next_arrival)

    def _join(self, r: int, stamp: float) -> None:
        self.arrival[r] = stamp
        self.waiting.append(r)

    # -- blocks ---------------------------------------------------------------------------------------------
    def _available(self, slot: int, tier: int) -> int:
        """Blocks the slot may take in a tier: the free ones not promised to others."""
        return self.kv.free(tier) - (self.kv.promised[tier] - self.promise[slot, tier])

    def _keep_promise(self, slot: int, tier: int, k: int) -> None:
        used = min(k, int(self.promise[slot, tier]))
        self.promise[slot, tier] -= used
        self.kv.promised[tier] -= used

    def _pool_ids(self, slot: int, j: np.ndarray) -> np.ndarray:
        """Pool blocks for the slot's logical blocks j: on the rank the placement gives (proportional: the slot's
        first rank, then the next, blocks_per_rank each), else on the pool rank with the most free blocks."""
        p = self.placement
        ranks = (self.first_rank[slot] + (j // p.blocks_per_rank if p.blocks_per_rank else j)) % p.ranks
        ids = np.empty(len(j), dtype=np.int64)
        for i, rank in enumerate(ranks):
            if self.kv.n_free[1 + rank] == 0:
                rank = int(np.argmax(self.kv.n_free[1:]))
            ids[i] = self.kv.take(1 + rank, 1)[0]
            self.rank_blocks[slot, rank] += 1
        return ids

    def _take_for(self, slot: int, j: np.ndarray) -> np.ndarray:
        tier = int(self.pooled[slot])
        self._keep_promise(slot, tier, len(j))
        return self._pool_ids(slot, j) if tier else self.kv.take(0, len(j))

    def _grow(self, slot: int, tokens: int, updates: list) -> bool:
        """Blocks for `tokens` in the slot's KV; False (nothing taken) when not enough are free."""
        need = blocks_for(tokens, self.bs) - self.held[slot]
        if need <= 0:
            return True
        if need > self._available(slot, int(self.pooled[slot])):
            return False
        j = np.arange(self.held[slot], self.held[slot] + need)
        ids = self._take_for(slot, j)
        self.table[slot, j] = ids
        updates.append(self._entries(np.full(need, slot), j, ids))
        self.held[slot] += need
        return True

    def _entries(self, slots, j, ids) -> np.ndarray:
        """Block-table entries (slot, index, id), tagged with the slot's admission number until the plan is built."""
        return np.stack([slots, j, ids, self.admit_seq[slots]], 1)

    def _live(self, rows: np.ndarray, slot_col: int) -> np.ndarray:
        """rows whose slot still holds the request they were made for (a request preempted in the same step
        leaves entries and moves behind)."""
        if not len(rows):
            return rows
        slots = rows[:, slot_col]
        return rows[(self.slot_req[slots] >= 0) & (self.admit_seq[slots] == rows[:, -1])]

    def _free_slot(self, slot: int) -> None:
        self.kv.give(self.table[slot, : self.held[slot]])
        self.kv.promised -= self.promise[slot]
        self.promise[slot] = 0
        self.held[slot] = self.ctx[slot] = self.target[slot] = 0
        self.rank_blocks[slot] = 0
        self.pooled[slot] = False
        self.slot_req[slot] = -1
        self.free_slots.append(slot)

    def _preempt_latest(self) -> bool:
        live = np.nonzero(self.slot_req >= 0)[0]
        if len(live) == 0:
            return False
        slot = int(live[np.argmax(self.admit_seq[live])])
        r = int(self.slot_req[slot])
        self.preemptions[r] += 1
        self._preempted_now += 1
        self._free_slot(slot)
        self.waiting.appendleft(r)
        return True

    def _migrate(self, slot: int, updates: list, moves: list) -> bool:
        """FA Pool: the slot's blocks move from the base to the pool (the engine copies them before the step's
        passes; the base's blocks are free for this step's other rows after the copy)."""
        n = int(self.held[slot])
        if n > self._available(slot, 1):
            return False
        old = self.table[slot, :n].copy()
        self.pooled[slot] = True
        self.first_rank[slot] = int(np.argmax(self.kv.n_free[1:]))
        j = np.arange(n)
        new = self._take_for(slot, j)
        self.table[slot, :n] = new
        updates.append(self._entries(np.full(n, slot), j, new))
        moves.append(np.stack([old, new, np.full(n, slot), np.full(n, self.admit_seq[slot])], 1))
        self.kv.give(old)
        self.kv.promised[0] -= self.promise[slot, 0]  # what the base kept for it is free for others
        self.promise[slot, 0] = 0
        self.migrated[self.slot_req[slot]] = True
        self._migrated_now += 1
        return True

    # -- one step -----------------------------------------------------------------------------------------
    def plan(self) -> StepPlan | None:
        """The next step, or None when nothing can run now (nothing admitted and nothing running)."""
        updates: list[np.ndarray] = []
        moves: list[np.ndarray] = []
        decode = np.nonzero((self.slot_req >= 0) & (self.ctx >= self.target) & (self.target > 0))[0]
        if self.placement is not None and len(decode):  # decode rows crossing the threshold move to the pool
            for slot in decode[~self.pooled[decode] & (self.ctx[decode] + 1 > self.placement.threshold)]:
                while self.slot_req[slot] >= 0 and not self._migrate(int(slot), updates, moves):
                    if self.cfg.on_kv_full != "preempt" or not self._preempt_latest():
                        break
            decode = decode[self.slot_req[decode] >= 0]
        # decode rows: the input token goes to position ctx, so the KV must hold ctx + 1 tokens
        if len(decode):
            grow = decode[blocks_for(self.ctx[decode] + 1, self.bs) > self.held[decode]]
            base = grow[~self.pooled[grow]]
            pooled = grow[self.pooled[grow]]
            # only under `preempt` can a tier run short: `reserve` promised every block a request will need
            while (len(base) > self.kv.free(0) - self.kv.promised[0] + np.minimum(self.promise[base, 0], 1).sum()
                   or len(pooled) > self.kv.free(1) - self.kv.promised[1] + np.minimum(self.promise[pooled, 1], 1).sum()):
                if not self._preempt_latest():
                    break
                decode, base, pooled = (x[self.slot_req[x] >= 0] for x in (decode, base, pooled))
            if len(base):
                used = np.minimum(self.promise[base, 0], 1)
                self.promise[base, 0] -= used
                self.kv.promised[0] -= used.sum()
                ids = self.kv.take(0, len(base))
                self.table[base, self.held[base]] = ids
                updates.append(self._entries(base, self.held[base], ids))
                self.held[base] += 1
            for slot in pooled:
                self._grow(int(slot), int(self.ctx[slot]) + 1, updates)
        budget = self.cfg.token_budget - len(decode)
        rows: list[tuple[int, int, int]] = []  # (slot, start, length)
        prefilling = np.nonzero((self.slot_req >= 0) & (self.ctx < self.target))[0]
        for slot in prefilling[np.argsort(self.admit_seq[prefilling])]:
            if budget <= 0:
                break
            budget -= self._chunk(int(slot), budget, rows, updates)
        while budget > 0 and self.waiting and self.free_slots:
            r = self.waiting[0]
            admitted = self._admit(r)
            if admitted is None:
                continue  # refused: it can never fit
            if admitted is False:
                break  # FCFS: the head waits for blocks, and so does everyone behind it
            budget -= self._chunk(admitted, budget, rows, updates)
        if not rows and not len(decode):
            if self.running and self.cfg.on_kv_full == "preempt" and self._preempt_latest():
                return self.plan()  # every running request is stuck mid-prefill without blocks: free the latest's
            return None
        return self._build(rows, decode, updates, moves)

    def _admit(self, r: int):
        """Admit the head of the queue: its slot; False when its blocks are not free yet; None when it can never fit
        (refused)."""
        context = int(self.req.prompt_len[r] + self.req.output_len[r] - 1)
        target = int(self.req.prompt_len[r] + self.generated[r])
        threshold = self.placement.threshold if self.placement else None
        # the tier its KV ends in: the pool past the threshold, or where the base could never hold its share
        ends_in = int(threshold is not None and (context > threshold or
                                                 blocks_for(min(context, threshold), self.bs) > self.kv.capacity(0)))
        if blocks_for(context, self.bs) > min(self.width, self.kv.capacity(ends_in)):
            self.waiting.popleft()
            self.refused[r] = True
            return None
        pooled = threshold is not None and (target > threshold or
                                            blocks_for(min(context, threshold), self.bs) > self.kv.capacity(0))
        need = np.zeros(2, dtype=np.int64)
        if self.cfg.on_kv_full == "reserve":
            if not pooled:
                need[0] = blocks_for(min(context, threshold) if threshold is not None else context, self.bs)
            need[1] = blocks_for(context, self.bs) if ends_in else 0
        else:
            need[int(pooled)] = blocks_for(target, self.bs)
        if any(need[t] > self.kv.free(t) - self.kv.promised[t] for t in (0, 1)):
            return False
        self.waiting.popleft()
        slot = self.free_slots.pop()
        self.slot_req[slot], self.ctx[slot], self.target[slot] = r, 0, target
        self.pooled[slot] = pooled
        if pooled:
            self.first_rank[slot] = int(np.argmax(self.kv.n_free[1:]))
        if self.cfg.on_kv_full == "reserve":
            self.promise[slot] = need
            self.kv.promised += need
        self.admit_seq[slot], self.seq = self.seq, self.seq + 1
        if np.isnan(self.admitted[r]):
            self.admitted[r] = self._now
        if r not in self.prompts:
            self.prompts[r] = self.prompt(r)
        return slot

    def _chunk(self, slot: int, budget: int, rows: list, updates: list) -> int:
        """A prefill chunk for `slot` within `budget` and the free blocks; the tokens it takes."""
        start = int(self.ctx[slot])
        n = min(int(self.target[slot]) - start, budget, self.budget_cap)
        if not self._grow(slot, start + n, updates):
            room = int(self.held[slot] + self._available(slot, int(self.pooled[slot]))) * self.bs - start
            n = min(n, room)  # as far as the free blocks go
            if n <= 0 or not self._grow(slot, start + n, updates):
                return 0
        rows.append((slot, start, n))
        return n

    def _pool_blocks_of(self, slots: np.ndarray) -> np.ndarray:
        """int [pool ranks]: the most blocks one of these slots' pooled rows holds on each pool rank (a pool rank
        gathers that many blocks a row: its own, not the rows' whole span)."""
        pooled = slots[self.pooled[slots]]
        if not self.pool_ranks or not len(pooled):
            return np.zeros(self.pool_ranks, dtype=np.int64)
        return self.rank_blocks[pooled].max(0)

    def _pool_writers_of(self, slots: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        """bool [pool ranks]: the ranks holding a block of the new positions [start, start + length) of one of these
        slots' pooled rows (the blocks are taken before the plan is built)."""
        writes = np.zeros(self.pool_ranks, dtype=bool)
        pooled = self.pooled[slots] & (length > 0)
        if not self.pool_ranks or not pooled.any():
            return writes
        s, first, last = slots[pooled], start[pooled] // self.bs, (start[pooled] + length[pooled] - 1) // self.bs
        j = np.minimum(first[:, None] + np.arange(int((last - first).max()) + 1), last[:, None])
        writes[self.kv.space_of(self.table[s[:, None], j]) - 1] = True
        return writes

    def _build(self, rows, decode, updates, moves) -> StepPlan:
        slots = np.array([s for s, _, _ in rows], dtype=np.int64)
        start = np.array([a for _, a, _ in rows], dtype=np.int64)
        length = np.array([n for _, _, n in rows], dtype=np.int64)
        tokens = np.zeros((len(rows), int(length.max()) if len(rows) else 0), dtype=np.int64)
        for i, (slot, a, n) in enumerate(rows):
            tokens[i, :n] = self._context_tokens(int(self.slot_req[slot]), a, n)
        last = start + length >= self.target[slots]
        dec_req = self.slot_req[decode]
        dec_tokens = self.out_tokens[self.offset[dec_req] + self.generated[dec_req] - 1]
        decode = decode.astype(np.int64)
        updates = self._live(np.concatenate(updates), 0)[:, :3] if updates else np.zeros((0, 3), dtype=np.int64)
        moves = self._live(np.concatenate(moves), 2)[:, :2] if moves else np.zeros((0, 2), dtype=np.int64)
        plan = StepPlan(self.steps, slots, start, length, last, tokens, decode, self.ctx[decode].copy(),
                        dec_tokens, updates, self.pooled[slots].copy(), self.pooled[decode].copy(), moves,
                        self._pool_blocks_of(slots), self._pool_blocks_of(decode),
                        self._pool_writers_of(slots, start, length),
                        self._pool_writers_of(decode, self.ctx[decode], np.ones(len(decode), dtype=np.int64)))
        self.ctx[slots] += length  # the chunk's KV is written by the step
        self.ctx[decode] += 1
        return plan
    def _context_tokens(self, r: int, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of request r's context: its prompt, then (after a preemption) its generated
        tokens."""
        prompt = self.prompts[r]
        p = len(prompt)
        if start + n <= p:
            return prompt[start: start + n]
        gen = self.out_tokens[self.offset[r]: self.offset[r] + self.generated[r]]
        return np.concatenate([prompt, gen])[start: start + n]

    _now = float("nan")

    def begin(self, now_trace: float, now: float, stamp_arrivals: bool) -> StepPlan | None:
        """Release what has arrived by trace time `now_trace` (stamped `now`, the replay's clock, if
        stamp_arrivals, else at their trace times), then plan the step that starts at `now`."""
        self._now = self._step_start = now
        self._preempted_now = self._migrated_now = 0
        self.release(now_trace, now if stamp_arrivals else None)
        return self.plan()

    def complete(self, plan: StepPlan, tokens: np.ndarray, now: float, host_s: float = 0.0, replayed: int = 0) -> None:
        """The step's new tokens [P + D] (prefill rows first; a prefill row that did not end its prompt emits
        nothing and its entry is ignored), known at `now`: advance, then stamp them."""
        self.stamp(self.advance(plan), tokens, now, host_s, replayed)

    def advance(self, plan: StepPlan) -> "Emission":
        """What a launched step does to the schedule, before its tokens are known: each emitting row's request has
        one more token, and finished requests leave (their blocks and slots free for the next plan). So the next
        step can be planned while this one runs; `stamp` records the tokens and their times once they are read."""
        P = len(plan.prefill_slots)
        emit_slots = np.concatenate([plan.prefill_slots[plan.prefill_last], plan.decode_slots])
        reqs = self.slot_req[emit_slots]
        resumed = reqs[:len(reqs) - len(plan.decode_slots)]
        resumed = resumed[self.generated[resumed] > 0]  # a preempted request's first token after its recompute
        at = self.offset[reqs] + self.generated[reqs]
        self.generated[reqs] += 1
        done = self.generated[reqs] >= self.req.output_len[reqs]
        finished = reqs[done]
        for r, slot in zip(finished, emit_slots[done]):
            self.prompts.pop(int(r), None)
            self._free_slot(int(slot))
        state = {"step": plan.index, "start": self._step_start, "running": self.running, "waiting": len(self.waiting),
                 "blocks_used": self.kv_blocks - self.n_free, "prefill_tokens": int(plan.prefill_len.sum()),
                 "decode_rows": len(plan.decode_slots), "preempted": self._preempted_now,
                 "pool_rows": int((self.pooled & (self.slot_req >= 0)).sum()),
                 "pool_blocks_used": self.kv.capacity(1) - self.kv.free(1),
                 "pool_ranks_used": int((self.rank_blocks.sum(0) > 0).sum()) if self.pool_ranks else 0,
                 "migrated": self._migrated_now}
        self.steps += 1
        return Emission(P, plan.prefill_last, reqs, at, np.concatenate([resumed, reqs[len(reqs) - len(plan.decode_slots):]]),
                        finished, state)

    def stamp(self, e: "Emission", tokens: np.ndarray, now: float, host_s: float = 0.0, replayed: int = 0) -> None:
        """A step's tokens, read at `now`: recorded, with first/last-token and finish times, and its log row.
        host_s: the replay's host time planning the step; replayed: its passes that ran from a captured graph."""
        self.out_tokens[e.at] = np.concatenate([tokens[:e.prefill_rows][e.prefill_last], tokens[e.prefill_rows:]])
        gaps = now - self.last_token[e.gap_reqs]
        if len(gaps):
            self.itl.append(gaps)
        first = e.reqs[np.isnan(self.first_token[e.reqs])]
        self.first_token[first] = now
        self.last_token[e.reqs] = now
        self.finished[e.finished] = now
        for key, value in (*e.state.items(), ("end", now), ("host_ms", host_s * 1e3), ("replayed", replayed)):
            self.log[key].append(value)

    def decode_window(self) -> tuple[np.ndarray, int] | None:
        """Where the coming steps can only be decode steps of the requests running now (in a replay in virtual
        time, between arrivals): (their slots, how many such steps come before one of them emits its last token);
        None where they cannot (something waits or prefills, a closed loop would release a request, an FA Pool
        row is in the pool or would cross the threshold). `skip_decode` runs them."""
        if self.waiting:
            return None
        slots = np.nonzero(self.slot_req >= 0)[0]
        if not len(slots) or (self.ctx[slots] < self.target[slots]).any() or (self.target[slots] <= 0).any():
            return None
        if self.closed and self.next_arrival < len(self.req) and len(slots) < self.closed:
            return None
        if (self.held[slots] < blocks_for(self.ctx[slots], self.bs)).any():
            return None  # skip_decode takes a row's blocks as its context needs them, from blocks that cover it
        reqs = self.slot_req[slots]
        steps = int((self.req.output_len[reqs] - self.generated[reqs]).min()) - 1
        if self.placement is not None:
            if self.pooled[slots].any():
                return None
            steps = min(steps, self.placement.threshold - int(self.ctx[slots].max()))
        return (slots, steps) if steps > 0 else None

    def skip_decode(self, slots: np.ndarray, start: float, ends, host_s: float = 0.0) -> int:
        """Decode steps of a `decode_window`'s slots in one go, the first starting at `start`, the j-th ending at
        ends[j] (and the next starting there): the state, token times and step log are what `begin` and
        `complete` leave for each step in turn (tokens: zeros, as a replay in virtual time gives). Stops short
        where the KV would run out (`plan` would preempt there); returns the steps run."""
        k = len(ends)
        c0, h0 = self.ctx[slots], self.held[slots]
        need = blocks_for(c0[None, :] + np.arange(1, k + 1)[:, None], self.bs)  # [k, rows]: blocks step j needs
        new = need > np.maximum(np.vstack([h0[None, :], need[:-1]]), h0[None, :])  # step j takes one for the row
        nth = np.cumsum(new, 0)  # blocks the row took in the window up to step j
        promise = self.promise[slots, 0]
        # under `reserve` a row's promised blocks cover its new ones; the others must be free and unpromised
        uncovered = np.cumsum((new & (nth > promise[None, :])).sum(1))
        k = int(np.searchsorted(uncovered, self.kv.free(0) - self.kv.promised[0], side="right"))
        if k == 0:
            return 0
        new, nth, ends = new[:k], nth[:k], np.asarray(ends[:k], dtype=np.float64)
        per_step = new.sum(1)
        taken = np.cumsum(per_step)
        # step j takes the stack's per_step[j] entries below what the steps before took, in slot order
        jj, ii = np.nonzero(new)
        pos = self.kv.n_free[0] - taken[jj] + np.arange(len(jj)) - (taken[jj] - per_step[jj])
        self.table[slots[ii], h0[ii] + nth[jj, ii] - 1] = self.kv.stacks[0][pos]
        blocks_used = self.kv_blocks - self.n_free + taken
        self.kv.n_free[0] -= int(taken[-1])
        got = nth[-1]
        used = np.minimum(got, promise)
        self.promise[slots, 0] -= used
        self.kv.promised[0] -= int(used.sum())
        self.held[slots] += got
        self.ctx[slots] += k
        reqs = self.slot_req[slots]
        self.out_tokens[(self.offset[reqs] + self.generated[reqs])[:, None] + np.arange(k)] = 0
        self.generated[reqs] += k
        gaps = [ends[0] - self.last_token[reqs]]
        if k > 1:
            gaps.append(np.repeat(ends[1:] - ends[:-1], len(slots)))
        self.itl.append(np.concatenate(gaps))
        self.first_token[reqs[np.isnan(self.first_token[reqs])]] = ends[0]
        self.last_token[reqs] = ends[-1]
        pool_blocks_used = self.kv.capacity(1) - self.kv.free(1)
        pool_ranks_used = int((self.rank_blocks.sum(0) > 0).sum()) if self.pool_ranks else 0
        columns = {"step": range(self.steps, self.steps + k), "start": [start, *ends[:-1].tolist()],
                   "end": ends.tolist(), "running": [len(slots)] * k, "waiting": [0] * k,
                   "blocks_used": blocks_used.tolist(), "prefill_tokens": [0] * k, "decode_rows": [len(slots)] * k,
                   "preempted": [0] * k, "pool_rows": [0] * k, "pool_blocks_used": [pool_blocks_used] * k,
                   "pool_ranks_used": [pool_ranks_used] * k, "migrated": [0] * k, "host_ms": [host_s * 1e3] * k,
                   "replayed": [0] * k}
        for key, values in columns.items():
            self.log[key].extend(values)
        self.steps += k
        return k

    def _past_prompt(self, plan: StepPlan) -> np.ndarray:
        """The plan's prefill rows that run past their prompt: a preempted request's recompute, whose input includes
        tokens it generated."""
        p_req = self.slot_req[plan.prefill_slots]
        return np.nonzero(plan.prefill_start + plan.prefill_len > self.req.prompt_len[p_req])[0]

    def recomputes(self, plan: StepPlan) -> bool:
        """Whether a prefill row of the plan is a recompute (its input needs the generated tokens read first)."""
        return len(self._past_prompt(plan)) > 0

    def refresh_inputs(self, plan: StepPlan) -> None:
        """Re-read a plan's input tokens that are generated tokens: a plan made while the previous step ran (after
        its `advance`, before its `stamp`) read them before they were known. Decode rows: their last token;
        prefill rows past the prompt: a preempted request's recompute."""
        dec_req = self.slot_req[plan.decode_slots]
        plan.decode_tokens[:] = self.out_tokens[self.offset[dec_req] + self.generated[dec_req] - 1]
        p_req = self.slot_req[plan.prefill_slots]
        for i in self._past_prompt(plan):
            n = int(plan.prefill_len[i])
            plan.prefill_tokens[i, :n] = self._context_tokens(int(p_req[i]), int(plan.prefill_start[i]), n)

    def tokens_of(self, r: int) -> np.ndarray:
        return self.out_tokens[self.offset[r]: self.offset[r] + self.generated[r]]

    def blocks_accounted(self) -> bool:
        """Every block is either free or held by a running request, exactly once."""
        held = np.concatenate([self.table[s, : self.held[s]] for s in np.nonzero(self.slot_req >= 0)[0]] or
                              [np.zeros(0, dtype=np.int64)])
        every = np.concatenate([self.kv.free_ids(), held])
        return len(every) == self.kv_blocks and len(np.unique(every)) == self.kv_blocks


def kv_blocks_needed(requests: Requests, cfg: ServingConfig, block_tokens: int) -> tuple[int, int]:
    """(blocks per slot, blocks for max_batch slots) of the trace's longest context, or of serving.max_context."""
    longest = cfg.max_context or int((requests.prompt_len + requests.output_len - 1).max())
    per_slot = blocks_for(longest, block_tokens)
    return per_slot, per_slot * cfg.max_batch

