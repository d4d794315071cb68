"""A trace replay on every rank: rank 0 schedules, every rank runs the step the plan describes.

Rank 0 owns the scheduler (harness/serving/scheduler.py) and the clock; each step it broadcasts the plan as one
int64 tensor (a fixed header, then the payload), so that every rank of every stage runs the same passes; the
engine returns the new tokens to rank 0, which reads them (the step's one synchronization) and stamps them.

Clocks: `wall` releases a request when the replay's wall clock passes its trace time (an idle engine sleeps
until the next arrival), `logical` when `logical_step_ms` per step has passed it (an idle engine jumps to the next
arrival), so that which request runs in which step, and so every token, is the same on every run. A closed loop
releases a request whenever fewer than its concurrency are in the system. Latencies are wall time either way;
with `logical` a request's arrival is stamped when it is released.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from harness.serving.scheduler import Scheduler, StepPlan, kv_blocks_needed
from harness.traces import Requests, load_trace, prompt_tokens
from model.parallel.serving_kv import ServingPass

# the plan's header: prefill rows, decode rows, table updates, chunk width, prefill keys spanned, done, migrations,
# pool ranks, decode keys spanned; then the payload (harness/serving/scheduler.StepPlan's arrays, in _pack's order)
HEADER = 9


@dataclass
class Replay:
    """What rank 0 keeps of a replay (other ranks: None fields)."""

    requests: Requests
    scheduler: Scheduler | None
    kv_blocks: int
    max_blocks: int
    duration_s: float
    emitted: list  # holder of the logits: per step, (request ids of the emitting rows, their logits)


class TokensOnTheirWay:
    """A step's new tokens, copied to the host as soon as the step's work is queued: on CUDA into pinned memory,
    asynchronously, with an event behind the copy, so that reading them waits for this step alone and not for a
    step launched after it (a plain copy would queue behind that step's work)."""

    def __init__(self, tokens: torch.Tensor):
        self.ready = None
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = tokens

    def read(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.numpy()


def capacity(cfg, engine, requests: Requests, device) -> tuple[int, int]:
    """(KV blocks every rank allocates, blocks per slot): serving.kv_blocks, or what kv_memory_fraction of this
    GPU's free memory holds, at most what max_batch requests of the longest context can use; the least over
    ranks, since block ids are shared."""
    s = cfg.serving
    per_slot, useful = kv_blocks_needed(requests, s, engine.serve_block_tokens(s.block_size))
    blocks = s.kv_blocks or useful
    if not s.kv_blocks and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        blocks = min(useful, int(free * s.kv_memory_fraction) // engine.serve_block_bytes(s.block_size))
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([blocks], dtype=torch.long, device=_comm_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        blocks = int(t)
    return blocks, per_slot


def _comm_device(device):
    return device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def _pack(plan: StepPlan | None, req_of_slot: np.ndarray | None, pool_ranks: int) -> np.ndarray:
    if plan is None:
        return np.array([0, 0, 0, 0, 0, 1, 0, 0, 0], dtype=np.int64)  # done: no payload
    P, D = len(plan.prefill_slots), len(plan.decode_slots)
    width = plan.prefill_tokens.shape[1] if P else 0
    upto = int((plan.prefill_start + plan.prefill_len).max()) if P else 0
    upto_decode = int(plan.decode_pos.max()) + 1 if D else 0
    header = np.array([P, D, len(plan.table_updates), width, upto, 0, len(plan.migrations), pool_ranks, upto_decode],
                      dtype=np.int64)
    body = [plan.prefill_slots, plan.prefill_start, plan.prefill_len, plan.prefill_last, req_of_slot[plan.prefill_slots],
            plan.prefill_pooled, plan.prefill_tokens.reshape(-1), plan.decode_slots, plan.decode_pos, plan.decode_tokens,
            req_of_slot[plan.decode_slots], plan.decode_pooled, plan.table_updates.reshape(-1),
            plan.migrations.reshape(-1), plan.prefill_pool_blocks, plan.decode_pool_blocks, plan.prefill_pool_writes,
            plan.decode_pool_writes]
    return np.concatenate([header] + [np.asarray(x, dtype=np.int64) for x in body])


def _broadcast(packed: np.ndarray | None, device) -> torch.Tensor:
    """Rank 0's packed plan on every rank, on the host (header first: the payload's size; NCCL sends from the
    device)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return torch.from_numpy(packed)
    comm = _comm_device(device)
    head = torch.from_numpy(packed[:HEADER]).to(comm) if packed is not None else torch.zeros(HEADER, dtype=torch.long, device=comm)
    dist.broadcast(head, src=0)
    P, D, U, W, _, done, M, R, _ = (int(x) for x in head.tolist())
    size = HEADER + 6 * P + P * W + 5 * D + 3 * U + 2 * M + 4 * R
    if size == HEADER or done:
        return head.cpu()
    body = torch.from_numpy(packed).to(comm) if packed is not None else torch.empty(size, dtype=torch.long, device=comm)
    dist.broadcast(body, src=0)
    return body.cpu()


def _to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device's queued work: a copy from pageable memory would
    first synchronize the stream, so a CUDA copy goes through pinned memory, asynchronously."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _unpack(host: torch.Tensor, device, first_pool_rank: int):
    """(passes [(ServingPass, tokens)], table updates, migrations, request ids per row, emitting rows) on `device`,
    or None when the replay is done. Counts and pool ranks are read on the host, before anything moves."""
    P, D, U, W, upto, done, M, R, upto_decode = (int(x) for x in host[:HEADER].tolist())
    if done:
        return None
    t = _to_device(host, device)
    at = HEADER

    def take(n, shape=None):
        nonlocal at
        x, at = t[at: at + n], at + n
        return x if shape is None else x.view(shape)

    p_slots, p_start, p_len, p_last, p_req, p_pooled = (take(P) for _ in range(6))
    p_tokens = take(P * W, (P, W))
    d_slots, d_pos, d_tokens, d_req, d_pooled = (take(D) for _ in range(5))
    updates = take(3 * U, (U, 3))
    migrations = take(2 * M, (M, 2))
    p_ranks, d_ranks = host[at: at + R].tolist(), host[at + R: at + 2 * R].tolist()
    p_writes, d_writes = host[at + 2 * R: at + 3 * R].tolist(), host[at + 3 * R: at + 4 * R].tolist()
    host_pooled = host[HEADER + 5 * P: HEADER + 6 * P], host[HEADER + 6 * P + P * W + 4 * D: HEADER + 6 * P + P * W + 5 * D]

    def fa_pool(pooled, pooled_host, blocks, writes):
        """FA Pool's fields of a pass: the pooled rows (device); the pool ranks in use with the most blocks a
        pooled row holds on each, and those that store the pass's new tokens (host)."""
        rows = _to_device(torch.nonzero(pooled_host).flatten(), device) if R else None
        used = [(first_pool_rank + i, n) for i, n in enumerate(blocks) if n]
        return dict(pooled=pooled.bool(), pool_rows=rows, pool_ranks=tuple(r for r, _ in used),
                    pool_blocks=tuple(n for _, n in used),
                    pool_writes=tuple(first_pool_rank + i for i, w in enumerate(writes) if w))

    passes = []
    if P:
        host_start, host_lens = host[HEADER + P: HEADER + 2 * P].tolist(), host[HEADER + 2 * P: HEADER + 3 * P].tolist()
        passes.append((ServingPass(p_slots, p_start, p_len, True, W, upto,
                                   **fa_pool(p_pooled, host_pooled[0], p_ranks, p_writes),
                                   host_start=tuple(host_start), host_lens=tuple(host_lens),
                                   host_pooled=tuple(bool(x) for x in host_pooled[0].tolist())), p_tokens))
    if D:
        passes.append((ServingPass(d_slots, d_pos, torch.ones_like(d_pos), False, 1, upto_decode,
                                   **fa_pool(d_pooled, host_pooled[1], d_ranks, d_writes)), d_tokens[:, None]))
    emits = torch.cat([p_last.bool(), torch.ones(D, dtype=torch.bool, device=device)])
    return passes, updates, migrations, torch.cat([p_req, d_req]), emits


def replay(cfg, engine, rank: int, device, requests: Requests | None = None, before_step=lambda i: None,
           warmup: bool = False, on_step=None, shaped_by: Requests | None = None) -> Replay:
    """Replay the trace (or `requests`) to the end, or to serving.max_steps. Every rank calls this. On CUDA, rank 0
    records an event before and after each step's device work (nothing waits on them until the end): the steps'
    device times, `device_ms` in the step log, and the device's idle time before each step, `gap_ms`
    (`waited_for_arrival`: the host had nothing to run and waited for a request, so that gap is the load's, not the
    host's). on_step(index, passes, updates, migrations): called before each
    step runs (a benchmark keeps some to time them alone). shaped_by: the requests that size the KV and the block
    tables (a warm-up replay's: the timed trace, so that both run on the same buffers)."""
    s, w = cfg.serving, cfg.workload
    requests = requests if requests is not None else load_trace(w.trace)
    blocks, per_slot = capacity(cfg, engine, shaped_by if shaped_by is not None else requests, device)
    held = getattr(engine, "serving_shape", None)
    if not s.kv_blocks and held is not None and (held[0], held[2], held[3]) == (s.max_batch, s.block_size, per_slot):
        blocks = held[1]  # the KV this engine holds was sized by the same rule; free memory now counts it as used
    block_tokens = engine.serve_block_tokens(s.block_size)
    placement = engine.serve_placement(block_tokens)  # FA Pool: its pool ranks hold `blocks` blocks each too
    pool_blocks = blocks if placement else 0
    if held != (s.max_batch, blocks, s.block_size, per_slot):
        engine.serve_setup(s.max_batch, blocks, s.block_size, per_slot, pool_blocks=pool_blocks)
        engine.serving_shape = (s.max_batch, blocks, s.block_size, per_slot)
        if hasattr(engine, "serve_capture_buckets"):
            engine.serve_capture_buckets()
    closed = w.trace.concurrency if w.trace.arrival == "closed" and not warmup else (len(requests) if warmup else 0)
    sched = None
    if rank == 0:
        vocab, seed = cfg.model.vocab_size, w.trace.seed
        sched = Scheduler(requests, s, blocks, per_slot, lambda r: prompt_tokens(seed, r, int(requests.prompt_len[r]), vocab),
                          closed_concurrency=closed, block_tokens=block_tokens, placement=placement,
                          pool_blocks=pool_blocks)
    pool_ranks = placement.ranks if placement else 0
    logical = s.clock == "logical" or warmup
    tick = s.logical_step_ms / 1e3
    emitted, trace_now = [], 0.0
    events = [] if device.type == "cuda" and rank == 0 else None
    t0 = time.perf_counter()
    step = 0
    waited = []  # rank 0, per step: whether the host waited for an arrival before planning it (the device idle by choice)
    launched_ahead = []  # rank 0, per step: whether it went to the device before the previous step's tokens were read
    feeds_itself = s.overlap_host and getattr(engine, "feeds_decode_tokens", False)
    launched = None  # rank 0: (emission, new tokens on the device, host s, graph passes) of the step in flight

    def read_launched():
        """Wait for the step in flight's tokens (the step's one synchronization) and stamp them."""
        nonlocal launched
        if launched is not None:
            emission, new_tokens, host_s, replayed = launched
            sched.stamp(emission, new_tokens.read(), time.perf_counter() - t0, host_s, replayed)
            launched = None

    while True:
        packed = None
        if rank == 0:
            # the next step is planned while the previous one runs on the device: its tokens are read only after
            plan, idle = None, False
            while not (s.max_steps and step >= s.max_steps):
                now = time.perf_counter() - t0
                host_start = now
                if not logical:
                    trace_now = now
                plan = sched.begin(trace_now, now, stamp_arrivals=logical or bool(closed))
                if plan is not None or sched.done():
                    break
                read_launched()  # nothing to plan: the step in flight's tokens first, then wait for arrivals
                idle = True
                nxt = sched.next_arrival_time(trace_now)
                if nxt is None:  # nothing runs and nothing more arrives: the rest was refused
                    break
                if logical:
                    trace_now = max(trace_now, nxt)
                else:
                    time.sleep(max(0.0, nxt - (time.perf_counter() - t0)))
            host_s = time.perf_counter() - t0 - host_start if plan is not None else 0.0
            # launched ahead: this step goes to the device before the one in flight's tokens are read; the engine
            # takes decode inputs from its own device copy, and a recompute's prefill needs generated tokens
            ahead = feeds_itself and plan is not None and not sched.recomputes(plan)
            if not ahead:
                read_launched()
                if plan is not None:
                    sched.refresh_inputs(plan)  # its input tokens that are generated ones, just read
            packed = _pack(plan, sched.slot_req, pool_ranks)
            waited.append(idle)
            launched_ahead.append(ahead)
        unpacked = _unpack(_broadcast(packed, device), device, cfg.strategy.tp)
        if unpacked is None:
            break
        passes, updates, migrations, row_req, emits = unpacked
        before_step(step + 1)
        if on_step is not None:
            on_step(step, passes, updates, migrations)
        n_logits, replayed = len(engine.logits), getattr(engine, "replayed_passes", 0)
        if events is not None:
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        tokens = engine.serve_step(passes, updates, migrations)
        if events is not None:
            events[-1][1].record()
        if engine.keep_logits and engine.has_logits:
            logits = torch.cat(engine.logits[n_logits:])
            del engine.logits[n_logits:]
            emitted.append((row_req[emits].cpu(), logits[emits].cpu()))
        if rank == 0:
            emission, tokens = sched.advance(plan), TokensOnTheirWay(tokens)
            read_launched()  # the previous step's tokens, if this one was launched ahead of reading them
            launched = (emission, tokens, host_s, getattr(engine, "replayed_passes", 0) - replayed)
            if not s.overlap_host:
                read_launched()
            if logical:
                trace_now += tick
        step += 1
    if rank == 0:
        read_launched()
    duration = time.perf_counter() - t0
    if events is not None:
        torch.cuda.synchronize()
        sched.log["device_ms"] = [a.elapsed_time(b) for a, b in events]
        # the device's idle time before each step: from the previous step's end event to this one's start event
        sched.log["gap_ms"] = [float("nan")] + [a[1].elapsed_time(b[0]) for a, b in zip(events, events[1:])]
        sched.log["waited_for_arrival"] = waited[: len(events)]
    if rank == 0:
        sched.log["launched_ahead"] = launched_ahead[: sched.steps]
    return Replay(requests, sched, blocks, per_slot, duration, emitted)


def warmup_requests(requests: Requests, n: int) -> Requests:
    """The first n requests, arriving together: the untimed warm-up replay's load."""
    n = min(n, len(requests))
    return Requests(np.zeros(n), requests.prompt_len[:n].copy(), requests.output_len[:n].copy(),
                    requests.source_line[:n].copy())

