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
class StepPlan:
    """One step: prefill rows (a chunk of a prompt each), then decode rows (one token each), and the block-table
    entries allocated for it. Arrays, one entry per row."""

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

    @property
    def rows(self) -> int:
        return len(self.prefill_slots) + len(self.decode_slots)

    @property
    def tokens(self) -> int:
        return int(self.prefill_len.sum()) + len(self.decode_slots)


def blocks_for(tokens, block_size: int):
    return -(-tokens // block_size)


class Scheduler:
    """Continuous batching over a trace's requests; see the module docstring. `prompt(r)` gives request r's prompt
    token ids (called once, at its first admission)."""

    def __init__(self, requests: Requests, cfg: ServingConfig, kv_blocks: int, max_blocks_per_slot: int,
                 prompt, closed_concurrency: int = 0, block_tokens: int | None = None):
        self.req, self.cfg, self.prompt = requests, cfg, prompt
        n, slots = len(requests), cfg.max_batch
        self.bs = block_tokens or cfg.block_size  # a request's tokens per block (the engine's: DCP spans its shards)
        self.width, self.closed = max_blocks_per_slot, closed_concurrency
        self.budget_cap = cfg.prefill_chunk or cfg.token_budget
        # free lists as stacks: ids [0, n_free) are free
        self.free_blocks, self.n_free = np.arange(kv_blocks, dtype=np.int64)[::-1].copy(), kv_blocks
        self.kv_blocks = kv_blocks
        self.free_slots = list(range(slots - 1, -1, -1))
        self.table = np.zeros((slots, max_blocks_per_slot), dtype=np.int64)  # host copy of the engine's block table
        # per slot (-1: free)
        self.slot_req = np.full(slots, -1, dtype=np.int64)
        self.held = np.zeros(slots, dtype=np.int64)  # blocks held
        self.ctx = np.zeros(slots, dtype=np.int64)  # tokens in the KV
        self.target = np.zeros(slots, dtype=np.int64)  # tokens to prefill (prompt, plus generated after a preemption)
        self.admit_seq = np.zeros(slots, dtype=np.int64)  # admission order, for FCFS chunks and preemption victims
        self.seq = 0
        # per request
        self.arrival = np.full(n, np.nan)  # when it joined the queue (the replay's clock)
        self.admitted = np.full(n, np.nan)
        self.first_token = np.full(n, np.nan)
        self.last_token = np.full(n, np.nan)
        self.finished = np.full(n, np.nan)
        self.generated = np.zeros(n, dtype=np.int64)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.refused = np.zeros(n, dtype=bool)
        self.offset = np.concatenate([[0], np.cumsum(requests.output_len)[:-1]]).astype(np.int64)
        self.out_tokens = np.zeros(int(requests.output_len.sum()), dtype=np.int64)  # every request's tokens, flat
        self.prompts: dict[int, np.ndarray] = {}  # prompt ids of requests admitted and not finished
        self.waiting: deque[int] = deque()
        self.next_arrival, self.steps = 0, 0
        self.itl: list[np.ndarray] = []  # per step, the inter-token gaps of its decode tokens
        self.log = {k: [] for k in ("step", "start", "end", "running", "waiting", "blocks_used", "prefill_tokens",
                                    "decode_rows", "preempted")}
        self._preempted_now = 0

    # -- state --------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return int((self.slot_req >= 0).sum())

    def done(self) -> bool:
        return self.next_arrival >= len(self.req) and not self.waiting and self.running == 0

    def next_arrival_time(self) -> float | None:
        """Trace time of the next request not yet released (None: all released, or a closed loop)."""
        if self.closed or self.next_arrival >= len(self.req):
            return None
        return float(self.req.arrival_s[self.next_arrival])

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
    def _take(self, k: int) -> np.ndarray:
        self.n_free -= k
        return self.free_blocks[self.n_free: self.n_free + k].copy()

    def _give(self, ids: np.ndarray) -> None:
        self.free_blocks[self.n_free: self.n_free + len(ids)] = ids
        self.n_free += len(ids)

    def _grow(self, slot: int, tokens: int, updates: list) -> bool:
        """Blocks for `tokens` in the slot's KV; False (nothing taken) when not enough are free."""
        need = blocks_for(tokens, self.bs) - self.held[slot]
        if need <= 0:
            return True
        if need > self.n_free:
            return False
        ids = self._take(need)
        j = np.arange(self.held[slot], self.held[slot] + need)
        self.table[slot, j] = ids
        updates.append(np.stack([np.full(need, slot), j, ids], 1))
        self.held[slot] += need
        return True

    def _free_slot(self, slot: int) -> None:
        self._give(self.table[slot, : self.held[slot]])
        self.held[slot] = self.ctx[slot] = self.target[slot] = 0
        self.slot_req[slot] = -1
        self.free_slots.append(slot)

    def _preempt_latest(self, exclude=()) -> bool:
        live = np.nonzero(self.slot_req >= 0)[0]
        live = live[~np.isin(live, exclude)]
        if len(live) == 0:
            return False
        slot = int(live[np.argmax(self.admit_seq[live])])
        r = int(self.slot_req[slot])
        self.preemptions[r] += 1
        self._preempted_now += 1
        self._free_slot(slot)
        self.waiting.appendleft(r)
        return True

    # -- one step -----------------------------------------------------------------------------------------
    def plan(self) -> StepPlan | None:
        """The next step, or None when nothing can run now (nothing admitted and nothing running)."""
        updates: list[np.ndarray] = []
        decode = np.nonzero((self.slot_req >= 0) & (self.ctx >= self.target) & (self.target > 0))[0]
        # decode rows: the input token goes to position ctx, so the KV must hold ctx + 1 tokens
        if len(decode):
            grow = decode[blocks_for(self.ctx[decode] + 1, self.bs) > self.held[decode]]
            while len(grow) > self.n_free:  # only under `preempt`: `reserve` holds every block it will need
                if not self._preempt_latest():
                    break
                decode = decode[self.slot_req[decode] >= 0]
                grow = grow[self.slot_req[grow] >= 0]
            if len(grow):
                ids = self._take(len(grow))
                self.table[grow, self.held[grow]] = ids
                updates.append(np.stack([grow, self.held[grow], ids], 1))
                self.held[grow] += 1
        budget = self.cfg.token_budget - len(decode)
        rows: list[tuple[int, int, int]] = []  # (slot, start, length)
        prefilling = np.nonzero((self.slot_req >= 0) & (self.ctx < self.target))[0]
        for slot in prefilling[np.argsort(self.admit_seq[prefilling])]:
            if budget <= 0:
                break
            budget -= self._chunk(int(slot), budget, rows, updates)
        while budget > 0 and self.waiting and self.free_slots:
            r = self.waiting[0]
            context = int(self.req.prompt_len[r] + self.req.output_len[r] - 1)
            if blocks_for(context, self.bs) > min(self.width, self.kv_blocks):  # can never fit
                self.waiting.popleft()
                self.refused[r] = True
                continue
            target = int(self.req.prompt_len[r] + self.generated[r])
            need = blocks_for(context if self.cfg.on_kv_full == "reserve" else target, self.bs)
            if need > self.n_free:
                break  # FCFS: the head waits for blocks, and so does everyone behind it
            self.waiting.popleft()
            slot = self.free_slots.pop()
            self.slot_req[slot], self.ctx[slot], self.target[slot] = r, 0, target
            self.admit_seq[slot], self.seq = self.seq, self.seq + 1
            if np.isnan(self.admitted[r]):
                self.admitted[r] = self._now
            if r not in self.prompts:
                self.prompts[r] = self.prompt(r)
            if self.cfg.on_kv_full == "reserve":
                self._grow(slot, context, updates)
            budget -= self._chunk(slot, budget, rows, updates)
        if not rows and not len(decode):
            if self.running and self.cfg.on_kv_full == "preempt" and self._preempt_latest():
                return self.plan()  # every running request is stuck mid-prefill without blocks: free the latest's
            return None
        return self._build(rows, decode, updates)

    def _chunk(self, slot: int, budget: int, rows: list, updates: list) -> int:
        """A prefill chunk for `slot` within `budget` and the free blocks; the tokens it takes."""
        start = int(self.ctx[slot])
        n = min(int(self.target[slot]) - start, budget, self.budget_cap)
        if not self._grow(slot, start + n, updates):
            n = min(n, int(self.held[slot] + self.n_free) * self.bs - start)  # as far as the free blocks go
            if n <= 0 or not self._grow(slot, start + n, updates):
                return 0
        rows.append((slot, start, n))
        return n

    def _build(self, rows, decode, updates) -> StepPlan:
        slots = np.array([s for s, _, _ in rows], dtype=np.int64)
        start = np.array([a for _, a, _ in rows], dtype=np.int64)
        length = np.array([n for _, _, n in rows], dtype=np.int64)
        tokens = np.zeros((len(rows), int(length.max()) if len(rows) else 0), dtype=np.int64)
        for i, (slot, a, n) in enumerate(rows):
            tokens[i, :n] = self._context_tokens(int(self.slot_req[slot]), a, n)
        last = start + length >= self.target[slots]
        dec_req = self.slot_req[decode]
        dec_tokens = self.out_tokens[self.offset[dec_req] + self.generated[dec_req] - 1]
        plan = StepPlan(self.steps, slots, start, length, last, tokens, decode.astype(np.int64), self.ctx[decode].copy(),
                        dec_tokens, np.concatenate(updates) if updates else np.zeros((0, 3), dtype=np.int64))
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
        self._preempted_now = 0
        self.release(now_trace, now if stamp_arrivals else None)
        return self.plan()

    def complete(self, plan: StepPlan, tokens: np.ndarray, now: float) -> None:
        """The step's new tokens [P + D] (prefill rows first; a prefill row that did not end its prompt emits
        nothing and its entry is ignored), known at `now`: record them, retire finished requests."""
        P = len(plan.prefill_slots)
        emit_slots = np.concatenate([plan.prefill_slots[plan.prefill_last], plan.decode_slots])
        emit_tokens = np.concatenate([tokens[:P][plan.prefill_last], tokens[P:]]).astype(np.int64)
        reqs = self.slot_req[emit_slots]
        self.out_tokens[self.offset[reqs] + self.generated[reqs]] = emit_tokens
        decoded = self.slot_req[plan.decode_slots]
        if len(decoded):
            self.itl.append(now - self.last_token[decoded])
        self.generated[reqs] += 1
        first = reqs[np.isnan(self.first_token[reqs])]
        self.first_token[first] = now
        self.last_token[reqs] = now
        finished = emit_slots[self.generated[reqs] >= self.req.output_len[reqs]]
        for slot in finished:
            r = int(self.slot_req[slot])
            self.finished[r] = now
            self.prompts.pop(r, None)
            self._free_slot(int(slot))
        log = self.log
        for key, value in (("step", plan.index), ("start", self._step_start), ("end", now), ("running", self.running),
                           ("waiting", len(self.waiting)), ("blocks_used", self.kv_blocks - self.n_free),
                           ("prefill_tokens", int(plan.prefill_len.sum())), ("decode_rows", len(plan.decode_slots)),
                           ("preempted", self._preempted_now)):
            log[key].append(value)
        self.steps += 1

    def tokens_of(self, r: int) -> np.ndarray:
        return self.out_tokens[self.offset[r]: self.offset[r] + self.generated[r]]

    def blocks_accounted(self) -> bool:
        """Every block is either free or held by a running request, exactly once."""
        held = np.concatenate([self.table[s, : self.held[s]] for s in np.nonzero(self.slot_req >= 0)[0]] or
                              [np.zeros(0, dtype=np.int64)])
        every = np.concatenate([self.free_blocks[: self.n_free], held])
        return len(every) == self.kv_blocks and len(np.unique(every)) == self.kv_blocks


def kv_blocks_needed(requests: Requests, cfg: ServingConfig, block_tokens: int) -> tuple[int, int]:
    """(blocks per slot, blocks for max_batch slots) of the trace's longest context, or of serving.max_context."""
    longest = cfg.max_context or int((requests.prompt_len + requests.output_len - 1).max())
    per_slot = blocks_for(longest, block_tokens)
    return per_slot, per_slot * cfg.max_batch

