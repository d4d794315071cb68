"""One rank's trace replay (workload.kind=trace): build the engine, warm up, replay, check every request against
the plain model, and (rank 0) write the record with its per-request and per-step tables beside it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.distributed as dist

from harness.check import RTOL, check_request, teacher_forced_logits
from harness.measure import PhaseTimer
from harness.record import RunRecord, environment, placement_of, run_id, where_this_rank_runs, write_atomically, write_record
from harness.serving.metrics import flat_metrics, request_table, step_table, summarize
from harness.serving.replay import replay, warmup_requests
from harness.traces import load_trace, prompt_tokens
from model.paged_attention import PLAN_BUILD, SERVING_PLAN
from model.parallel.static import PREFILL_GRAPH_MIN

REQUESTS_FILE, STEPS_FILE = "requests.csv", "steps.csv"


def serve(cfg, cfg_dict, rank, world, device, backend, out_dir, build_engine, perturb_weights, inject_fault):
    requests = load_trace(cfg.workload.trace)
    timer = PhaseTimer(device, enabled=False)
    engine = build_engine(cfg, rank, world, device, timer)
    perturb_weights(engine, cfg.fault, rank)
    if cfg.serving.warmup_requests:
        replay(cfg, engine, rank, device, warmup_requests(requests, cfg.serving.warmup_requests), warmup=True,
               shaped_by=requests)
        engine.reset_measurements()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine.keep_logits = cfg.check_reference
    result = replay(cfg, engine, rank, device, requests, before_step=lambda i: inject_fault(cfg.fault, rank, i))
    engine.keep_logits = False
    report = engine.report()
    report["rank"] = rank
    report.update(where_this_rank_runs())
    if device.type == "cuda":
        report["peak_bytes"], report["memory_source"] = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        report["peak_bytes"], report["memory_source"] = report["weight_bytes"] + report["kv_bytes"], "tensor bytes held (CPU)"
    if cfg.check_reference:
        served = [None]
        if rank == 0:
            sched = result.scheduler
            served = [{r: sched.tokens_of(r).copy() for r in range(len(requests)) if sched.generated[r]}]
        dist.broadcast_object_list(served, src=0)
        if engine.has_logits:
            report["request_checks"] = check_requests(cfg, result.emitted, served[0], device, requests)
    reports = [None] * world
    dist.gather_object(report, reports if rank == 0 else None, dst=0)
    if rank == 0:
        write_serving_record(cfg, cfg_dict, result, reports, world, backend, out_dir)
    return engine


def check_requests(cfg, emitted, served: dict, device, requests) -> dict:
    """Every served request's logits (as the holder of the logits kept them, step by step) against the plain
    model's, teacher-forced on the tokens rank 0 recorded (harness/check.check_request)."""
    from model.transformer import build_model

    per_request: dict[int, list] = {}
    for reqs, logits in emitted:
        for r, row in zip(reqs.tolist(), logits):
            per_request.setdefault(r, []).append(row)
    dtype = getattr(torch, cfg.hardware.dtype)
    model = build_model(cfg.model, dtype, device)
    t = cfg.workload.trace
    rows = {}
    for r, tokens in served.items():
        mine = torch.stack(per_request.get(r, []) or [torch.zeros(0)])
        if mine.shape[0] != len(tokens):
            rows[r] = {"tokens": len(tokens), "passed": False, "error": f"{mine.shape[0]} logits for {len(tokens)} tokens"}
            continue
        length = int(requests.prompt_len[r])
        prompt = torch.from_numpy(prompt_tokens(t.seed, r, length, cfg.model.vocab_size)).to(device)
        served_t = torch.from_numpy(tokens).to(device)
        ref = teacher_forced_logits(model, prompt, served_t)
        rows[r] = check_request(mine.to(device), ref, served_t, RTOL[cfg.hardware.dtype])
    return rows


def write_table(df, directory: str | Path, name: str) -> Path:
    """A CSV beside the record, atomically (harness/record.write_atomically)."""
    return write_atomically(df.to_csv(index=False), directory, name)


def write_serving_record(cfg, cfg_dict, result, reports, world, backend, out_dir, env: dict | None = None) -> RunRecord:
    """The replay's record (env: a projection's, instead of this machine's) and its tables beside it."""
    sched = result.scheduler
    table = request_table(sched)
    checks = next((r.pop("request_checks") for r in reports if "request_checks" in r), None)
    check = None
    if checks is not None:
        table["check_passed"] = table.request.map(lambda r: checks[r]["passed"] if r in checks else None)
        table["max_rel_logit_error"] = table.request.map(lambda r: checks[r].get("max_rel_logit_error") if r in checks else None)
        failed = sorted(r for r, c in checks.items() if not c["passed"])
        check = {"per_request": True, "teacher_forced": True, "requests_checked": len(checks),
                 "tokens_checked": sum(c["tokens"] for c in checks.values()),
                 "requests_failed": failed[:20], "n_failed": len(failed),
                 "max_rel_logit_error": max((c.get("max_rel_logit_error") or 0.0 for c in checks.values()), default=None),
                 "argmax_flips": sum(c.get("argmax_flips", 0) for c in checks.values()),
                 "rtol": RTOL[cfg.hardware.dtype], "passed": not failed and len(checks) == int((sched.generated > 0).sum())}
    table["tokens_sha256"] = [hashlib.sha256(sched.tokens_of(r).tobytes()).hexdigest()[:16] for r in table.request]
    summary = summarize(sched, table, world, cfg.serving.slo_ttft_ms, cfg.serving.slo_tpot_ms)
    steps = step_table(sched)
    write_table(table, out_dir, REQUESTS_FILE)
    write_table(steps, out_dir, STEPS_FILE)
    roles = {}
    for r in reports:
        roles.setdefault(r["role"], []).append(r)
    memory = {role: {"peak_bytes_max": max(r["peak_bytes"] for r in rs), "weight_bytes_max": max(r["weight_bytes"] for r in rs),
                     "kv_bytes_max": max(r["kv_bytes"] for r in rs), "source": rs[0]["memory_source"]}
              for role, rs in roles.items()}
    s = cfg.serving
    record = RunRecord(
        run_id=run_id(cfg_dict), status="ok", config=cfg_dict, env=env or environment(world, cfg.hardware.device, backend, placement=placement_of(reports)),
        metrics=flat_metrics(summary), memory=memory,
        ranks=reports, reference_check=check, tokens_sha256=hashlib.sha256(sched.out_tokens.tobytes()).hexdigest(),
        serving={"trace": result.requests.summary(), "kv_blocks": result.kv_blocks, "block_size": s.block_size,
                 "max_blocks_per_request": result.max_blocks, "on_kv_full": s.on_kv_full, "clock": s.clock,
                 "decode_plan": SERVING_PLAN, "decode_plan_build": PLAN_BUILD, "buckets_captured_at_setup": True,
                 "prefill_graph_rows": PREFILL_GRAPH_MIN[0],
                 "blocks_returned": bool(sched.blocks_accounted() and sched.n_free == sched.kv_blocks),
                 "files": {"requests": REQUESTS_FILE, "steps": STEPS_FILE}},
        passes={"warmup": f"an untimed replay of the first {s.warmup_requests} request(s), arriving together",
                "timed": "the replay: latencies on the wall clock at step boundaries, where rank 0 reads the step's "
                         f"tokens; each step's time is in {STEPS_FILE} (device_ms: CUDA events around its device "
                         "work on GPUs, the price of a projection; start and end on the replay's clock)",
                "reference_check": "per request, during the timed replay: the holder of the logits keeps each "
                                   "emitted token's logits (a host copy per step)" if check else None},
    )
    write_record(record, out_dir)
    return record
