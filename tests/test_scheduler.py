"""The continuous-batching scheduler on its own: a stand-in engine whose token is the context length it saw, so
that a request's tokens show whether any was lost, repeated or computed from the wrong context (preemption)."""
from collections import deque

import numpy as np
import pytest

from harness.serving.scheduler import Scheduler, ServingConfig
from harness.traces import Requests


def requests(prompts, outputs, arrivals=None):
    n = len(prompts)
    return Requests(np.asarray(arrivals if arrivals is not None else np.zeros(n), dtype=float),
                    np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64), np.arange(1, n + 1))


def drive(sched, tick=1.0, max_steps=10_000, check_every_step=True):
    """Logical-time replay against the stand-in engine; returns the plans."""
    plans, now = [], 0.0
    while not sched.done() and len(plans) < max_steps:
        plan = sched.begin(now, now, stamp_arrivals=True)
        if plan is None:
            nxt = sched.next_arrival_time(now)
            if nxt is None:
                break
            now = max(now + tick, nxt)
            continue
        assert plan.tokens <= sched.cfg.token_budget and sched.running <= sched.cfg.max_batch
        # the stand-in engine: each row's token is the number of tokens in its context after the step
        tokens = np.concatenate([plan.prefill_start + plan.prefill_len, plan.decode_pos + 1])
        sched.complete(plan, tokens, now + 0.5)
        if check_every_step:
            assert sched.blocks_accounted()
        plans.append(plan)
        now += tick
    return plans


def make(reqs, on_kv_full="reserve", kv_blocks=64, **kw):
    cfg = ServingConfig(on_kv_full=on_kv_full, block_size=4, **{"max_batch": 4, "token_budget": 16} | kw)
    width = -(-int((reqs.prompt_len + reqs.output_len).max()) // 4)
    return Scheduler(reqs, cfg, kv_blocks, width, lambda r: np.full(int(reqs.prompt_len[r]), r))


def assert_tokens_right(sched):
    for r in range(len(sched.req)):
        if sched.refused[r]:
            continue
        p, o = int(sched.req.prompt_len[r]), int(sched.req.output_len[r])
        assert list(sched.tokens_of(r)) == list(range(p, p + o)), r


@pytest.mark.parametrize("policy", ["reserve", "preempt"])
def test_every_request_completes_with_its_tokens_and_blocks_return(policy):
    rng = np.random.default_rng(0)
    reqs = requests(rng.integers(1, 30, 40), rng.integers(1, 12, 40), np.sort(rng.uniform(0, 30, 40)))
    sched = make(reqs, policy)
    plans = drive(sched)
    assert not np.isnan(sched.finished).any() and (sched.generated == reqs.output_len).all()
    assert_tokens_right(sched)
    assert sched.n_free == sched.kv_blocks and sched.blocks_accounted() and not sched.prompts
    # the occupancy log is the scheduler's own state after each step
    assert len(sched.log["blocks_used"]) == len(plans) and max(sched.log["blocks_used"]) <= sched.kv_blocks
    # requests joined while others ran, and a step both admitted and retired requests
    assert any(len(p.prefill_slots) and len(p.decode_slots) for p in plans)


def test_preemption_recomputes_and_loses_nothing():
    reqs = requests([10, 10, 10, 10], [20, 20, 20, 20])  # 4 x 30 tokens want 32 blocks of 4; only 16 exist
    sched = make(reqs, "preempt", kv_blocks=16)
    drive(sched)
    assert sched.preemptions.sum() > 0 and sum(sched.log["preempted"]) == sched.preemptions.sum()
    assert (sched.generated == 20).all()
    assert_tokens_right(sched)  # a recomputed request's next token came from prompt + every token it had
    assert sched.n_free == 16 and sched.blocks_accounted()


def test_reserve_waits_for_blocks_and_never_preempts():
    reqs = requests([10, 10, 10, 10], [20, 20, 20, 20])
    sched = make(reqs, "reserve", kv_blocks=16)
    drive(sched)
    assert sched.preemptions.sum() == 0 and (sched.generated == 20).all()
    assert max(sched.log["running"]) == 2  # 8 blocks each: two at a time
    assert_tokens_right(sched)


def test_a_request_that_can_never_fit_is_refused_and_the_rest_run():
    reqs = requests([10, 200, 10], [5, 5, 5])
    cfg = ServingConfig(block_size=4, max_batch=4, token_budget=16)
    sched = Scheduler(reqs, cfg, 64, 8, lambda r: np.zeros(int(reqs.prompt_len[r]), dtype=np.int64))
    drive(sched)
    assert list(sched.refused) == [False, True, False] and np.isnan(sched.finished[1])
    assert (sched.generated[[0, 2]] == 5).all()


def test_fcfs_token_budget_and_chunking():
    reqs = requests([40, 3], [2, 2])
    sched = make(reqs, token_budget=16, prefill_chunk=8)
    plans = drive(sched)
    first = plans[0]
    # request 0 is first in line: its first chunk is capped at prefill_chunk, then request 1 gets the rest
    assert list(first.prefill_len) == [8, 3] and list(first.prefill_start) == [0, 0]
    assert sched.first_token[1] < sched.first_token[0]  # a short request behind a long prompt is not held up


def test_closed_loop_keeps_its_concurrency():
    reqs = requests([5] * 12, [3] * 12)
    cfg = ServingConfig(block_size=4, max_batch=8, token_budget=32)
    sched = Scheduler(reqs, cfg, 64, 4, lambda r: np.zeros(5, dtype=np.int64), closed_concurrency=3)
    drive(sched)
    assert max(sched.log["running"]) == 3 and (sched.generated == 3).all()


class WatchedQueue(deque):
    """A deque that counts how often it is walked or read past its head."""

    walks = 0

    def __iter__(self):
        WatchedQueue.walks += 1
        return super().__iter__()

    def __getitem__(self, i):
        if i != 0:
            WatchedQueue.walks += 1
        return super().__getitem__(i)


def test_a_step_reads_the_waiting_queue_at_its_head_only():
    """What keeps a step's host work flat in the number of waiting requests (harness/bench_scheduler.py times it)."""
    reqs = requests([4] * 1008, [50] * 1008)
    sched = make(reqs, kv_blocks=8 * 14, max_batch=8, token_budget=64)
    sched.waiting = WatchedQueue()
    drive(sched, max_steps=20, check_every_step=False)
    assert len(sched.waiting) == 1000 and sched.running == 8 and WatchedQueue.walks == 0


@pytest.mark.parametrize("policy", ["reserve", "preempt"])
def test_fa_pool_placement_pools_long_requests_and_migrates_the_ones_that_cross(policy):
    from harness.serving.scheduler import PoolPlacement

    # threshold 24 tokens: prompts of 30 start in the pool; 20 + 10 outputs cross it while decoding and migrate
    reqs = requests([30, 20, 8, 20, 30, 5], [4, 10, 3, 10, 6, 2], [0, 0, 1, 2, 3, 4])
    cfg = ServingConfig(on_kv_full=policy, block_size=4, max_batch=4, token_budget=16)
    sched = Scheduler(reqs, cfg, 24, 12, lambda r: np.zeros(int(reqs.prompt_len[r]), dtype=np.int64),
                      placement=PoolPlacement(threshold=24, ranks=3, blocks_per_rank=4), pool_blocks=10)
    plans = drive(sched)
    assert (sched.generated == reqs.output_len).all()
    assert_tokens_right(sched)
    assert list(sched.migrated) == [False, True, False, True, False, False]
    assert sum(sched.log["migrated"]) == 2 and sched.n_free == sched.kv_blocks and sched.blocks_accounted()
    moves = np.concatenate([p.migrations for p in plans])
    assert len(moves) and (moves[:, 0] < 24).all() and (moves[:, 1] >= 24).all()  # base blocks to pool blocks
    # a request of 30 + 6 tokens (9 blocks) fills pool ranks 4 blocks at a time: 3 ranks at its peak
    assert max(sched.log["pool_ranks_used"]) >= 2 and max(sched.log["pool_rows"]) >= 1
    pooled_rows = [p for p in plans if p.decode_pooled.any()]
    assert all(p.decode_pool_blocks.any() for p in pooled_rows)
    # keys and values go to the ranks that store a pass's new tokens, a subset of those in use: a pooled decode row's
    # one new token is on one rank, while its earlier blocks keep other ranks in use
    for p in plans:
        for blocks, writes in ((p.prefill_pool_blocks, p.prefill_pool_writes), (p.decode_pool_blocks, p.decode_pool_writes)):
            assert not (writes & (blocks == 0)).any()
    assert all(p.decode_pool_writes.sum() <= p.decode_pooled.sum() for p in pooled_rows)
    assert any(p.decode_pool_writes.sum() < (p.decode_pool_blocks > 0).sum() for p in pooled_rows)
    # the rank storing a pooled decode row's new token holds the row's block of that position (the block table as
    # the plans' entries built it up to that step)
    table = {}
    for p in plans:
        table.update({(int(s), int(j)): int(b) for s, j, b in p.table_updates})
        table.update({k: int(new) for k, b in table.items() for old, new in p.migrations if b == old})
        for slot, pos in zip(p.decode_slots[p.decode_pooled], p.decode_pos[p.decode_pooled]):
            assert p.decode_pool_writes[sched.kv.space_of(np.array([table[int(slot), int(pos) // 4]]))[0] - 1]


def test_a_request_migrated_and_preempted_in_one_step_leaves_no_stale_moves():
    from harness.serving.scheduler import PoolPlacement

    reqs = requests([1, 5, 10], [1, 8, 3], [0, 0, 5])
    cfg = ServingConfig(on_kv_full="preempt", block_size=1, max_batch=3, token_budget=32)
    sched = Scheduler(reqs, cfg, 64, 40, lambda r: np.full(int(reqs.prompt_len[r]), r),
                      placement=PoolPlacement(threshold=10, ranks=1, blocks_per_rank=0), pool_blocks=15)
    plans = drive(sched)
    for p in plans:  # every block a step copies into, or points a row at, is written once and is the row's
        assert len(np.unique(p.migrations[:, 1])) == len(p.migrations)
        assert len(np.unique(p.table_updates[:, 2])) == len(p.table_updates)
    assert sched.preemptions.sum() > 0 and any(len(p.migrations) for p in plans)
    assert_tokens_right(sched)


def test_a_request_whose_base_share_never_fits_starts_in_the_pool():
    from harness.serving.scheduler import PoolPlacement

    # 8 base blocks of 4 tokens; request 0's prompt of 36 is under the threshold of 40, but the base holds 32
    reqs = requests([36, 4], [10, 2], [0, 1])
    for policy in ("reserve", "preempt"):
        sched = Scheduler(reqs, ServingConfig(on_kv_full=policy, block_size=4, max_batch=4, token_budget=64), 8, 16,
                          lambda r: np.zeros(int(reqs.prompt_len[r]), np.int64),
                          placement=PoolPlacement(threshold=40, ranks=2, blocks_per_rank=2), pool_blocks=16)
        drive(sched)
        assert (sched.generated == reqs.output_len).all() and not sched.refused.any()
        assert_tokens_right(sched)


def test_a_closed_loop_goes_on_past_a_refused_request():
    reqs = requests([200, 5, 5, 5], [3, 3, 3, 3])
    cfg = ServingConfig(block_size=4, max_batch=4, token_budget=32)
    sched = Scheduler(reqs, cfg, 64, 8, lambda r: np.zeros(int(reqs.prompt_len[r]), dtype=np.int64), closed_concurrency=1)
    drive(sched)
    assert list(sched.refused) == [True, False, False, False] and (sched.generated[1:] == 3).all()


def test_inter_token_gaps_cover_every_token_after_the_first_preemptions_included():
    reqs = requests([10, 10, 10, 10], [20, 20, 20, 20])
    sched = make(reqs, "preempt", kv_blocks=16)
    drive(sched)
    assert sched.preemptions.sum() > 0
    assert sum(len(g) for g in sched.itl) == int((reqs.output_len - 1).sum())
