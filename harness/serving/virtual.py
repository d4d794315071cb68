"""A trace replay in virtual time (`launcher=model` with a trace workload): the serving scheduler itself
(harness/serving/scheduler.py, the same code a measured replay runs), each step priced by the performance model
(harness/perfmodel.predict_serving_step) as the serving engines run it, the clock advanced by that price. Nothing
runs on a device; the record and its tables are a measured replay's, marked `projected`.

KV capacity per rank comes from hardware.memory_gb: what serving.kv_memory_fraction of it holds after the rank's
weights and a workspace, in the strategy's blocks (every rank of a static group holds its heads of every block;
DCP's block spans its shards; FA Pool's base and pool ranks hold blocks of their own sizes). Without memory_gb
the KV is unbounded (max_batch requests of the longest context).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from harness.preflight import memory_by_role
from harness.calibration import default_calibration
from harness.perfmodel import ServingPricer, serving_config
from harness.serving.replay import Replay
from harness.serving.run import write_serving_record
from harness.serving.scheduler import Scheduler, kv_blocks_needed
from harness.strategies import spec_of
from harness.traces import TraceError, load_trace, recorded_trace
from model.paged_attention import PLAN_BUILD

WORKSPACE_BYTES = 1 << 30  # activations, graphs and allocator slack per GPU (memory.py's workspace)


def block_bytes(cfg) -> tuple[int, int, int]:
    """(tokens of a request per scheduler block, bytes of one block on a base/static rank, on a pool rank)."""
    return spec_of(cfg.strategy).serving_block_bytes(cfg)


def capacity(cfg, requests):
    """(base or static blocks, pool blocks per pool rank, blocks per slot, placement) for cfg's hardware."""
    s, sv = cfg.strategy, cfg.serving
    tokens, base_bytes, pool_bytes = block_bytes(cfg)
    per_slot, useful = kv_blocks_needed(requests, sv, tokens)
    cap = cfg.hardware.memory_gb * 1e9 * sv.kv_memory_fraction
    weights = max(r.weight_bytes for r in memory_by_role(cfg))
    blocks = sv.kv_blocks or (min(useful, int(max(cap - weights - WORKSPACE_BYTES, 0) // base_bytes)) if cap else useful)
    placement, pool_blocks = spec_of(s).serving_placement(cfg, tokens), 0
    if placement is not None:
        pool_blocks = sv.kv_blocks or (min(useful, int(max(cap - WORKSPACE_BYTES, 0) // pool_bytes)) if cap else useful)
    return blocks, pool_blocks, per_slot, placement


def virtual_replay(cfg, cal=None, decode_plan: str | None = None, buckets_at_setup: bool = True,
                   prefill_graph_rows: int | None = None, plan_build: str = PLAN_BUILD) -> Replay:
    """cfg's trace replayed in virtual time: the scheduler, each step priced by the model (cal: its calibration,
    default the committed one; decode_plan: the paged kernel's plan, default the serving engines';
    buckets_at_setup: every decode bucket is captured before the replay, as the engines do, else a step that meets
    a bucket first pays its capture; prefill_graph_rows: small prefill passes of at least this many rows replay
    graphs of token-count buckets where decode is captured, 0 none; None: as the engines do). The step log's
    device_ms holds each step's price."""
    sv, w = cfg.serving, cfg.workload
    requests = load_trace(w.trace)
    blocks, pool_blocks, per_slot, placement = capacity(cfg, requests)
    closed = w.trace.concurrency if w.trace.arrival == "closed" else 0
    sched = Scheduler(requests, sv, blocks, per_slot, lambda r: np.zeros(int(requests.prompt_len[r]), dtype=np.int64),
                      closed_concurrency=closed, block_tokens=block_bytes(cfg)[0], placement=placement,
                      pool_blocks=pool_blocks)
    cal = cal or default_calibration()
    price = ServingPricer(serving_config(cfg), cal, table_tokens=per_slot * block_bytes(cfg)[0], decode_plan=decode_plan,
                          prefill_graph_rows=engines_prefill_graph_rows() if prefill_graph_rows is None
                          else prefill_graph_rows, plan_build=plan_build)
    host_s = sv.host_step_ms / 1e3
    now, costs = 0.0, []
    captured = set(price.buckets()) if buckets_at_setup else set()  # decode buckets already captured
    while not sched.done() and not (sv.max_steps and sched.steps >= sv.max_steps):
        plan = sched.begin(now, now, stamp_arrivals=bool(closed))
        if plan is None:
            nxt = sched.next_arrival_time(now)
            if nxt is None:
                break
            now = max(now, nxt)
            continue
        bucket = price.bucket(len(plan.decode_pos)) if len(plan.decode_pos) else None
        cost = host_s + price.step(plan.prefill_start, plan.prefill_len, plan.prefill_pooled, plan.decode_pos + 1,
                                   plan.decode_pooled, capture=bucket is not None and bucket not in captured)
        captured.add(bucket)
        costs.append(cost * 1e3)
        now += cost
        sched.complete(plan, np.zeros(plan.rows, dtype=np.int64), now, host_s)
        now = _decode_until_event(sched, price, now, host_s, closed, costs, captured)
    sched.log["device_ms"] = costs
    result = Replay(requests, sched, blocks, per_slot, now, [])
    result.pool_blocks, result.calibration = pool_blocks, cal.source
    return result


def _decode_until_event(sched, price, now: float, host_s: float, closed: int, costs: list, captured: set) -> float:
    """Between events (an arrival, a request's last token) the steps are decode steps of the same rows, one token
    further each: priced here one after another and handed to the scheduler in one go (Scheduler.skip_decode),
    which leaves what step-by-step planning would (the first of them captures the rows' bucket if none has met it:
    `captured`). Returns the clock after them."""
    window = sched.decode_window()
    if window is None:
        return now
    slots, steps = window
    if sched.cfg.max_steps:
        steps = min(steps, sched.cfg.max_steps - sched.steps)
    arrival = None if closed else sched.next_arrival_time(now)
    ctx, pooled = sched.ctx[slots] + 1, np.zeros(len(slots), dtype=bool)
    rows, ctx_sum, ctx_max = len(slots), int(ctx.sum()), int(ctx.max())
    bucket = price.bucket(rows)
    start, ends, priced = now, [], []
    for j in range(steps):
        if arrival is not None and now >= arrival:
            break  # `begin` releases it
        capture = j == 0 and bucket is not None and bucket not in captured
        if price.by_totals:  # what price.step gives for these rows, from their row count and total context
            cost = price.decode_totals_s(rows, ctx_sum + rows * j, ctx_max + j)
            cost = host_s + (price.capture_s(0.0, 0.0, cost) if capture else cost)
        else:
            cost = host_s + price.step((), (), (), ctx + j, pooled, capture=capture)
        now += cost
        ends.append(now)
        priced.append(cost * 1e3)
    if not ends:
        return start
    ran = sched.skip_decode(slots, start, ends, host_s)
    if ran:
        captured.add(bucket)
    costs.extend(priced[:ran])
    return ends[ran - 1] if ran else start


def project_serving(cfg, cfg_dict: dict, out_dir) -> None:
    """Replay cfg's trace in virtual time and write the projected record and its tables (harness/serving/run.py)."""
    result = virtual_replay(cfg)
    blocks, pool_blocks = result.kv_blocks, result.pool_blocks
    _, base_bytes, pool_bytes = block_bytes(cfg)
    reports = [{"role": r.role, "rank": i, "weight_bytes": r.weight_bytes,
                "kv_bytes": pool_blocks * pool_bytes if r.role == "pool" else blocks * base_bytes,
                "peak_bytes": r.weight_bytes + (pool_blocks * pool_bytes if r.role == "pool" else blocks * base_bytes)
                + WORKSPACE_BYTES, "memory_source": "projected: weights + KV blocks + 1 GiB workspace"}
               for i, r in enumerate(memory_by_role(cfg))]
    env = {"source": "projected", "hardware": cfg.hardware.name, "model": "harness/perfmodel.py",
           "calibration": result.calibration, "kv_blocks": blocks, "pool_blocks_per_rank": pool_blocks}
    write_serving_record(cfg, cfg_dict, result, reports, cfg.strategy.world_size, None, out_dir, env=env)


def _measured_calibration(cfg, path):
    """The default calibration on the limits measured in the same benchmark run as the record at `path` (the
    bench_serving.json of a folder above it), where there is one."""
    import dataclasses
    import json
    from pathlib import Path

    cal = default_calibration()
    bench = next((p / "bench_serving.json" for p in Path(path).resolve().parents if (p / "bench_serving.json").exists()), None)
    if bench is not None:
        lim = json.loads(bench.read_text())["limits"]
        cal = dataclasses.replace(cal, read_bw=lim["read_bytes_per_s"],
                                  gemm_flops_fraction=lim["gemm_flops_per_s"] / (cfg.hardware.peak_tflops * 1e12)
                                  if cfg.hardware.peak_tflops else cal.gemm_flops_fraction)
    return cal


# A measured replay whose record does not name its decode plan ran before the serving engines took the ragged plan.
EARLIER_DECODE_PLAN = "splits"


def recorded_decode_plan(rec) -> str:
    """The paged kernel's plan a measured replay's decode passes ran."""
    return rec.serving.get("decode_plan", EARLIER_DECODE_PLAN)


def recorded_plan_build(rec) -> str:
    """How a measured replay's engine built the ragged plan of a decode pass (model/paged_attention.PLAN_BUILDS):
    its `decode_plan_build`; `decode_plan_builds: pass` for engines that built it once a pass in one program;
    "layer" for records with neither (engines before model/paged_attention.pass_plan)."""
    return rec.serving.get("decode_plan_build") or rec.serving.get("decode_plan_builds", "layer")


def engines_prefill_graph_rows() -> int:
    """The fewest rows of a prefill pass the serving engines replay from a token-count bucket graph."""
    from model.parallel.static import PREFILL_GRAPH_MIN

    return PREFILL_GRAPH_MIN[0]


def recorded_prefill_graph_rows(rec) -> int:
    """The fewest rows of a prefill pass a measured replay's engine replayed from a bucket graph (0: every pass
    eager). Records of engines that replayed only passes through one mask say `prefill_graphs` (more than
    ROWS_ONE_BY_ONE rows); records with neither field ran every prefill pass eagerly."""
    from model.parallel.serving_kv import ROWS_ONE_BY_ONE

    if "prefill_graph_rows" in rec.serving:
        return int(rec.serving["prefill_graph_rows"])
    return ROWS_ONE_BY_ONE + 1 if rec.serving.get("prefill_graphs") else 0


def recorded_buckets_at_setup(rec) -> bool:
    """Whether a measured replay's engine captured every decode bucket before it (records without the field: each
    bucket was captured by the first step that met it)."""
    return bool(rec.serving.get("buckets_captured_at_setup", False))


def _measured_records(root):
    """(record path, record, its config with the KV blocks it ran with and its trace file found on this machine:
    harness/traces.recorded_trace) of every measured trace replay under root."""
    import dataclasses

    from harness.collect import find_records
    from harness.config import from_dict

    good, _ = find_records(root)
    for path, rec in good:
        if rec.status != "ok" or not rec.serving or rec.env.get("source") == "projected":
            continue
        cfg = from_dict(rec.config)
        try:
            trace = recorded_trace(cfg.workload.trace)
        except TraceError:  # kept as recorded: a caller that replays it raises, naming where it looked
            trace = cfg.workload.trace
        workload = dataclasses.replace(cfg.workload, trace=trace)
        yield path, rec, dataclasses.replace(cfg, workload=workload,
                                             serving=dataclasses.replace(cfg.serving, kv_blocks=rec.serving["kv_blocks"]))


def host_step_ms(steps: "pd.DataFrame") -> float:
    """A measured replay's host time per step, as the device saw it: the median over steps of the time from one
    step's start to the next's less the step's device time (planning, the plan's copy, the token read and the
    bookkeeping; with the host's work overlapped, what is left of it)."""
    period = (steps.start.shift(-1) - steps.start) * 1e3
    return float((period - steps.device_ms).median())


def measured_steps(cfg, path) -> "pd.DataFrame":
    """A measured replay's steps (its step log beside the record at `path`), each with its composition: the
    scheduler run again on the replay's own clock (each step planned at its measured start, completed at its
    end) plans the same steps, which is checked against the log's prefill tokens and decode rows."""
    from pathlib import Path

    steps = pd.read_csv(next(Path(path).parent.glob("steps.csv*")))
    requests = load_trace(cfg.workload.trace)
    blocks, _, per_slot, placement = capacity(cfg, requests)
    closed = cfg.workload.trace.concurrency if cfg.workload.trace.arrival == "closed" else 0
    sched = Scheduler(requests, cfg.serving, blocks, per_slot, lambda r: np.zeros(int(requests.prompt_len[r]), dtype=np.int64),
                      closed_concurrency=closed, block_tokens=block_bytes(cfg)[0], placement=placement)
    rows = []
    for step in steps.itertuples():
        plan = sched.begin(step.start, step.start, stamp_arrivals=bool(closed))
        if plan is None or plan.tokens - len(plan.decode_slots) != step.prefill_tokens or \
                len(plan.decode_slots) != step.decode_rows:
            raise ValueError(f"{path}: step {step.step} is not the step the scheduler plans on the replay's clock")
        ctx = plan.decode_pos + 1
        rows.append({"decode_ctx": ctx, "prefill_start": plan.prefill_start, "prefill_len": plan.prefill_len,
                     "ctx_sum": int(ctx.sum()), "ctx_max": int(ctx.max()) if len(ctx) else 0})
        sched.complete(plan, np.zeros(plan.rows, dtype=np.int64), step.end, step.host_ms / 1e3)
    return pd.concat([steps.reset_index(drop=True), pd.DataFrame(rows)], axis=1).assign(table_tokens=per_slot * block_bytes(cfg)[0])


def fit_serving_decode(root, rates=(0.5, 1)) -> tuple[float, float]:
    """(paged_token_s, serving_layer_s) of the Calibration: least squares over the relative error of the decode-only
    steps that replayed a graph, in the measured replays under root at these offered rates, each priced by the
    model on the run's limits with the two terms in question; serving_layer_s in closed form for each
    paged_token_s of a fine grid."""
    import dataclasses

    from harness.perfmodel import ServingPricer

    cols = []  # per step: measured s, the price without both terms, the longest program's walk (tokens), layers
    at_rates = lambda folder, rec: rec.config["workload"]["trace"].get("rate") in rates  # noqa: E731
    for steps, price, rec in _priced_steps(root, at_rates, paged_token_s=1.0, serving_layer_s=0.0):
        cfg = price.cfg
        bare = ServingPricer(cfg, dataclasses.replace(price.cal, paged_token_s=0.0), table_tokens=price.table_tokens,
                             decode_plan=price.decode_plan, plan_build=price.plan_build)
        for st in steps[(steps.prefill_tokens == 0) & (steps.replayed > 0)].itertuples():
            walk = price.longest_program_s(st.decode_rows, st.ctx_max, st.ctx_sum)  # tokens: paged_token_s = 1
            cols.append((st.device_ms / 1e3, bare.decode_totals_s(st.decode_rows, st.ctx_sum, st.ctx_max), walk,
                         bare.decode_totals_s(st.decode_rows, st.ctx_sum, st.ctx_max) -
                         bare.decode_totals_s(st.decode_rows, 0, st.ctx_max), cfg.model.n_layers // cfg.strategy.pp))
    y, base, walk, attn, layers = (np.array(c, dtype=float) for c in zip(*cols))
    best = None
    for c in np.linspace(0, 200e-9, 2001):
        # the price with c: base - attn + layers * max(attn / layers, walk * c) + layers * f0
        without = base - attn + layers * np.maximum(attn / layers, walk * c)
        w = layers / y  # relative error: minimize sum(((without + layers f0) / y - 1)^2) over f0
        f0 = float(np.sum(w * (1 - without / y)) / np.sum(w * w))
        err = float(np.sum(((without + layers * f0) / y - 1) ** 2))
        if best is None or err < best[0]:
            best = (err, c, f0)
    return float(best[1]), float(best[2])


# The bounds a projected replay is held to against the measured one: |relative error| of its p50 TPOT and p99 TTFT
SERVING_BOUNDS = {"TPOT p50": 0.15, "TTFT p99": 0.25}


def check_serving(root) -> "pd.DataFrame":
    """Every measured trace replay under root against its replay in virtual time: the same config, trace window,
    rate and KV blocks, the model calibrated on the limits measured in the same benchmark run where the folder
    above the records has them (bench_serving.json), each step charged the replay's own host time per step
    (host_step_ms). `within bounds`: every error SERVING_BOUNDS names is inside its bound. A replay whose trace
    file is not on this machine, or whose file gives other requests than the record's, is left out: the table's
    attrs["skipped"] lists each with the reason."""
    import dataclasses
    from pathlib import Path

    from harness.serving.metrics import request_table, summarize

    rows, skipped = [], []
    for path, rec, cfg in _measured_records(root):
        record = str(Path(path).parent.relative_to(root))
        steps = pd.read_csv(next(Path(path).parent.glob("steps.csv*")))
        host = host_step_ms(steps)
        cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, host_step_ms=host))
        try:
            projected = virtual_replay(cfg, _measured_calibration(cfg, path), recorded_decode_plan(rec),
                                       recorded_buckets_at_setup(rec), recorded_prefill_graph_rows(rec),
                                       recorded_plan_build(rec))
        except TraceError as err:
            skipped.append((record, str(err)))
            continue
        recorded = rec.serving.get("trace") or {}
        replayed = projected.requests.summary()
        if any(key in recorded and not np.isclose(replayed[key], recorded[key], rtol=1e-9)
               for key in ("requests", "prompt_mean", "prompt_max", "output_mean")):
            skipped.append((record, f"{cfg.workload.trace.path} gives other requests than the record's "
                                    f"({replayed['requests']} requests, prompt mean {replayed['prompt_mean']:.1f}; "
                                    f"recorded {recorded.get('requests')}, {recorded.get('prompt_mean', 0):.1f})"))
            continue
        table = request_table(projected.scheduler)
        p = summarize(projected.scheduler, table, cfg.strategy.world_size, cfg.serving.slo_ttft_ms, cfg.serving.slo_tpot_ms)
        m = rec.metrics
        row = {"record": record, "strategy": cfg.strategy.name,
               "offered req/s": m["offered_rate"], "host ms/step": host}
        for key, name in (("ttft_ms_p50", "TTFT p50"), ("ttft_ms_p99", "TTFT p99"), ("tpot_ms_p50", "TPOT p50"),
                          ("tpot_ms_p99", "TPOT p99")):
            row[f"{name} measured"], row[f"{name} projected"] = m[key], p.latency[key]
            row[f"{name} error"] = p.latency[key] / m[key] - 1 if m[key] else None
        row["goodput measured"], row["goodput projected"] = m["goodput"], p.goodput
        row["within bounds"] = all(row[f"{name} error"] is not None and abs(row[f"{name} error"]) <= bound
                                   for name, bound in SERVING_BOUNDS.items())
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["skipped"] = skipped
    return table


def _priced_steps(root, keep, **cal_fields):
    """(steps with their composition, pricer, record) of the measured replays under root that keep(folder relative to
    root, record) chooses, each priced on its run's limits with cal_fields set."""
    import dataclasses
    from pathlib import Path

    from harness.perfmodel import ServingPricer, serving_config

    for path, rec, cfg in _measured_records(root):
        if not keep(str(Path(path).parent.relative_to(root)), rec):
            continue
        cal = dataclasses.replace(_measured_calibration(cfg, path), **cal_fields)
        steps = measured_steps(cfg, path)
        yield steps, ServingPricer(serving_config(cfg), cal, table_tokens=int(steps.table_tokens.iloc[0]),
                                   decode_plan=recorded_decode_plan(rec),
                                   prefill_graph_rows=recorded_prefill_graph_rows(rec),
                                   plan_build=recorded_plan_build(rec)), rec


def fit_serving_prefill_host(root, records=("closed256/records/rate_1",), under_s: float = 1e-3) -> float:
    """Calibration.serving_prefill_host_layer_s: over the steps of these replays whose prefill pass the model
    prices under `under_s` on the device (short chunks: the pass is its host's launches) and whose decode pass,
    if any, replayed a graph, the median of the step's device time less its decode pass's price, per layer."""
    per_layer = []
    for steps, price, _ in _priced_steps(root, lambda folder, rec: folder in records, serving_prefill_host_layer_s=0.0):
        layers = price.cfg.model.n_layers // price.cfg.strategy.pp
        for st in steps[(steps.prefill_tokens > 0) & ((steps.decode_rows == 0) | (steps.replayed > 0))].itertuples():
            pre = price.step(st.prefill_start, st.prefill_len, np.zeros(len(st.prefill_len), bool), (), ())
            if pre < under_s:
                dec = price.decode_totals_s(st.decode_rows, st.ctx_sum, st.ctx_max) if st.decode_rows else 0.0
                per_layer.append((st.device_ms / 1e3 - dec) / layers)
    return float(np.median(per_layer))


def fit_masked_attention(root, records=("rates/records/rate_1",)) -> float:
    """Calibration.masked_attn_flops_fraction: the rate at which the steps of these replays whose prefill pass
    attends through one mask (and whose decode pass, if any, replayed a graph) are priced at their measured device
    time in the median (bisection: the price falls as the rate rises)."""
    chosen = []
    for steps, price, _ in _priced_steps(root, lambda folder, rec: folder in records):
        masked = [price.spec.serving_prefill_masked(len(x)) for x in steps.prefill_len]
        for st in steps[np.array(masked) & ((steps.decode_rows == 0) | (steps.replayed > 0))].itertuples():
            chosen.append((price, st))
    lo, hi = np.log(1e-3), np.log(1.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        ratios = []
        for price, st in chosen:
            price.cal.masked_attn_flops_fraction = float(np.exp(mid))
            ratios.append(price.step(st.prefill_start, st.prefill_len, np.zeros(len(st.prefill_len), bool),
                                     st.decode_ctx, np.zeros(len(st.decode_ctx), bool)) * 1e3 / st.device_ms)
        lo, hi = (mid, hi) if np.median(ratios) > 1 else (lo, mid)
    return float(np.exp((lo + hi) / 2))


def fit_serving_prefill_parts(path) -> tuple[float, float, float]:
    """(serving_prefill_attn_flops_fraction, serving_gather_bw_fraction, serving_prefill_elementwise_passes) of the
    Calibration, from the sampled mixed steps of the replay at `path` whose prefill pass the profiler took apart
    (bench_serving.json written with --profile; passes of rows attended one by one): the attention kernels' time
    against the pass's attention FLOPs over the GEMM rate (least squares through the origin), and the time of the
    kernels neither GEMM nor attention against two columns, the padded activations' bytes and four times the
    cached keys and values gathered (least squares, each over the read bandwidth)."""
    import json
    from pathlib import Path

    from harness.costs import rows_cached_kv_bytes, rows_prefill_attn_flops

    bench = json.loads((Path(path) / "bench_serving.json").read_text())
    profiled = {st["step"]: st for st in bench["steps_alone"] if st["kind"] == "mixed" and "prefill other ms" in st}
    attn, other = [], []
    for steps, price, rec in _priced_steps(path, lambda folder, rec: True):
        cfg, b, bw, flops = price.cfg, price.b, price.bw, price.flops
        h, layers = cfg.model.hidden, cfg.model.n_layers
        for st in steps[steps.step.isin(list(profiled))].itertuples():
            starts, lens = list(st.prefill_start), list(st.prefill_len)
            if price.spec.serving_prefill_masked(len(lens)) or price.prefill_bucket(starts, lens) is not None:
                continue  # attended through one mask (masked_attn_flops_fraction prices those)
            work = layers * sum(rows_prefill_attn_flops(h, starts, lens))
            attn.append((work / flops, profiled[st.step]["prefill attention ms"] / 1e3))
            activations = layers * len(lens) * max(lens) * h * b / bw
            gathered = layers * 4 * rows_cached_kv_bytes(h, b, starts, lens) / bw
            other.append((activations, gathered, profiled[st.step]["prefill other ms"] / 1e3))
    if not attn:
        raise ValueError(f"{path}/bench_serving.json: no profiled prefill pass of rows attended one by one; run "
                         "harness/bench_serving.py with --profile")
    x, t = np.array(attn).T
    (passes, per_gather), *_ = np.linalg.lstsq(np.array(other)[:, :2], np.array(other)[:, 2], rcond=None)
    return float((x @ x) / (x @ t)), float(1 / per_gather), float(passes)


def fit_ragged_plan_build(path) -> float:
    """Calibration.ragged_plan_pass_s: the median time of the ragged plan's build alone (`plan_us`) over the
    batches of harness/bench_paged.py --ragged at `path` (ragged.json), for the serving engines' plan
    (RAGGED_PROGRAMS_PER_SM programs an SM: the benchmark's ragged_x4)."""
    import json
    import statistics
    from pathlib import Path

    points = json.loads((Path(path) / "ragged.json").read_text())["points"]
    builds = [p["plan_us"] * 1e-6 for p in points if p.get("plan") == "ragged_x4" and p.get("plan_us")]
    if not builds:
        raise ValueError(f"{path}/ragged.json: no ragged_x4 point with plan_us; run harness/bench_paged.py --ragged")
    return statistics.median(builds)


def fit_ragged_plan_tile(path) -> float:
    """Calibration.ragged_plan_tile_s: least squares through the origin of one build of the ragged plan (the
    profiler's `_plan_kernel` time over its calls) against the tiles the model counts for one build as the
    replay's engine built it (StaticSpec.plan_build_s at one second a tile), over the sampled decode steps of the
    replay at `path` (bench_serving.json written with --profile) whose top kernels list the plan's."""
    import dataclasses
    import json
    from pathlib import Path

    from harness.config import from_dict
    from harness.perfmodel import ServingPricer, serving_config
    from harness.record import read_record

    res = json.loads((Path(path) / "bench_serving.json").read_text())
    rec = read_record(next(Path(path).glob("records/*/result.json")))
    cfg = from_dict(rec.config)
    if recorded_plan_build(rec) == "pass_tiles":
        raise ValueError(f"{path}: its engine built the plan a program a tile, side by side, whose time is not a "
                         "count of tiles; fit Calibration.ragged_plan_pass_s instead (fit_ragged_plan_build)")
    # the profile times each call: one build of one program comparing the tiles in turn
    price = ServingPricer(serving_config(cfg), dataclasses.replace(default_calibration(), ragged_plan_tile_s=1.0),
                          decode_plan="ragged", plan_build="pass")
    tiles, build_s = [], []
    for st in res["steps_alone"]:
        plan = [k for k in st.get("kernels") or () if k["name"] == "_plan_kernel"]
        if st["kind"] == "decode" and plan:
            tiles.append(price.spec.plan_build_s(price, st["decode rows"]))
            build_s.append(plan[0]["ms"] / plan[0]["calls"] * 1e-3)
    if not tiles:
        raise ValueError(f"{path}/bench_serving.json: no sampled decode step lists _plan_kernel; run "
                         "harness/bench_serving.py with --profile")
    tiles, build_s = np.array(tiles), np.array(build_s)
    return float(tiles @ build_s / (tiles @ tiles))
