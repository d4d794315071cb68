"""One rank's whole run: set up torch.distributed, build the strategy's engine, warm up, measure,
gather every rank's report to rank 0, and (rank 0) write the record."""
from __future__ import annotations

import contextlib
import faulthandler
import gc
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from harness.check import RTOL, compare_logits, reference_decode, verdict
from harness.config import BenchConfig, from_dict
from harness.strategies import load_plugins, spec_of
from harness.measure import (DECODE_RANGE, PREFILL_RANGE, PhaseTimer, StepClock, breakdown, compute_metrics,
                             device_events, nvml_utilization, pool_utilization, profile_summary)
from harness.record import RunRecord, environment, placement_of, run_id, where_this_rank_runs, write_record
from harness.workload import make_prompts

log = logging.getLogger("fapool.runner")


def pick_device(cfg: BenchConfig, local_rank: int) -> torch.device:
    if cfg.hardware.device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_backend(cfg: BenchConfig) -> str:
    if cfg.launcher.dist_backend != "auto":
        return cfg.launcher.dist_backend
    return "nccl" if cfg.hardware.device == "cuda" else "gloo"


def build_engine(cfg: BenchConfig, rank: int, world: int, device, timer):
    return spec_of(cfg.strategy).build_engine(cfg, rank, world, device, getattr(torch, cfg.hardware.dtype), timer)


def inject_fault(fault, rank: int, step: int) -> None:
    if fault is None or fault.kind == "none" or fault.rank != rank or fault.step != step:
        return
    log.warning("injecting fault %r on rank %d at step %d", fault.kind, rank, step)
    if fault.kind == "raise":
        raise RuntimeError(f"injected fault: rank {rank} raised at decode step {step}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "hang":  # never reaches the next collective: the peers wait on it
        time.sleep(10**6)


def wrong_token(fault, rank: int, step: int) -> bool:
    """The injected fault `wrong_token`: this rank records (not feeds back) a wrong token at this step."""
    return fault is not None and fault.kind == "wrong_token" and fault.rank == rank and fault.step == step


def generate(engine, prompts, n_out: int, max_len: int, synthetic: bool, seed: int, clock: StepClock | None = None,
             fault=None, rank: int = 0, forced: torch.Tensor | None = None, phases: dict | None = None,
             profiler=None, profiled: str = DECODE_RANGE):
    """Prefill (or synthetic KV), then n_out - 1 decode steps under the engine's schedule. Returns tokens
    [B, n_out] where known. forced [B, n_out]: teacher forcing, decode step i is fed forced[:, i - 1].
    phases: filled with the engine timer's report of the decode steps alone (reset after prefill, read
    before teardown). profiler: a torch.profiler run around the phase `profiled` names: DECODE_RANGE, started
    after the prefill and stopped after the last decode step; PREFILL_RANGE, around the prefill alone. The GPU
    drained, and the ranks met, before it starts (a rank whose profiler starts late must not show up as its
    peers' wait); its timeline counts the device work issued inside that range."""
    if clock:
        clock.start()
    with profiled_range(profiler if profiled == PREFILL_RANGE else None, PREFILL_RANGE):
        if synthetic:
            lens = torch.tensor([len(p) for p in prompts])
            tok = engine.synthetic_prefill(lens, max_len, seed)
            settle()  # filling GBs of random KV is no decode work: no step may wait on another rank's fill
        else:
            tok = engine.prefill(prompts, max_len)
    engine.mark_prefill()
    if clock:
        clock.mark()
    if phases is not None:
        engine.timer.reset()
    out = [tok]
    progress = tqdm(total=n_out - 1, desc="decode", unit="step", leave=False,  # rank 0, on a terminal only
                    disable=clock is None or not sys.stderr.isatty())

    def after(i, tokens):
        out.append(tokens + 1 if wrong_token(fault, rank, i) and tokens is not None else tokens)
        if clock:
            clock.mark()
        progress.update()

    with profiled_range(profiler if profiled == DECODE_RANGE else None, DECODE_RANGE):
        engine.decode_steps(tok, n_out - 1, forced=forced, before=lambda i: inject_fault(fault, rank, i), after=after)
    progress.close()
    if clock:
        clock.stop()
    if phases is not None:
        phases.update(engine.timer.report())
    engine.finish()
    return torch.stack(out, 1) if engine.has_tokens else None


@contextlib.contextmanager
def profiled_range(profiler, name: str):
    """A phase under the profiler (none: just the phase): queued work drained and the ranks met before it starts,
    the phase's work drained before it stops; the range `name` marks where device_events begins."""
    if profiler is None:
        yield
        return
    settle()
    profiler.start()
    settle()
    with torch.profiler.record_function(name):
        yield
    settle(meet=False)
    profiler.stop()


def settle(meet: bool = True) -> None:
    """Every rank's queued work done, then all ranks together unless not `meet` (outside the measured steps only)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if meet and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def perturb_weights(engine, fault, rank: int) -> None:
    """The injected fault `perturb_weight`: noise of 1% of its spread on this rank's first weight matrix after
    the embedding (a projection), a real numerical error that the reference check must catch (the reference
    builds its own, unperturbed model)."""
    if fault is None or fault.kind != "perturb_weight" or fault.rank != rank:
        return
    modules = engine.model if hasattr(engine, "model") else engine.modules
    weights = [p for p in modules.parameters() if p.ndim == 2]
    w = weights[1] if len(weights) > 1 else weights[0]
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(rank)).to(w)
    with torch.no_grad():
        w.add_(noise * 0.01 * w.float().std().to(w.dtype))


def reference_check(cfg: BenchConfig, engine, prompts, max_len: int, device, rank: int, world: int):
    """Teacher-forced comparison with the plain model (harness/check.py). Every rank runs it; returns (the
    check, on the rank that holds the logits, else None; the tokens this rank recorded in the forced pass)."""
    holders = [None] * world
    dist.all_gather_object(holders, bool(engine.has_logits))
    holder = holders.index(True)
    ref = reference_decode(cfg, prompts, device) if rank == holder else None
    box = [ref[0].cpu() if ref is not None else None]
    dist.broadcast_object_list(box, src=holder)
    engine.reset_measurements()
    engine.keep_logits = True
    fault = cfg.fault if cfg.fault.kind == "wrong_token" else None  # a broken token path shows in this pass too
    forced_tokens = generate(engine, prompts, cfg.workload.output_tokens, max_len, False, cfg.workload.seed,
                             fault=fault, rank=rank, forced=box[0])
    engine.keep_logits = False
    if rank != holder:
        return None, forced_tokens
    logits = torch.stack(engine.logits)  # [n, B, V]
    check = compare_logits(logits, ref[1], RTOL[cfg.hardware.dtype])
    check["strategy_argmax"] = logits.argmax(-1).t().cpu().tolist()
    check["reference_tokens"] = box[0].tolist()
    return check, forced_tokens


def run_rank(cfg_dict: dict, rank: int, world: int, init_method: str, out_dir: str, local_rank: int | None = None):
    """Entry of one rank (a local process or a Slurm task). Rank 0 writes result.json into out_dir."""
    cfg = from_dict(cfg_dict)
    torch.manual_seed(0)
    torch.set_num_threads(threads_per_rank(world))
    device = pick_device(cfg, rank if local_rank is None else local_rank)
    backend = dist_backend(cfg)
    # device_id: NCCL creates the world communicator now, eagerly, as CUDA graph capture needs
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.launcher.timeout_s),
                            device_id=device if backend == "nccl" else None)
    engine = None
    try:
        check_placement(cfg, rank_placement())
        engine = _measure(cfg, cfg_dict, rank, world, device, backend, out_dir)
    finally:
        if engine is not None:
            engine.release_graphs()
            del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if not _destroy_process_group(TEARDOWN_S):
            # measured and recorded already: leave without the communicators' teardown rather than hang the sweep
            log.warning("rank %d: destroy_process_group did not finish in %d s; exiting without it", rank, TEARDOWN_S)
            failed = sys.exc_info()[0] is not None
            if failed:
                Path(out_dir, f"rank{rank}.error").write_text(traceback.format_exc())
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1 if failed else 0)


TEARDOWN_S = 30


def threads_per_rank(world: int) -> int:
    """CPU threads for this rank: the CPUs Slurm gave its task, else this machine's cores over the tasks on it (a
    local run puts every rank here)."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return max(1, int(slurm))
    here = int(os.environ.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or world
    return max(1, (os.cpu_count() or 1) // max(here, 1))


def rank_placement() -> list[dict]:
    """Every rank's host and Slurm node id, in rank order (one all-gather)."""
    places = [None] * dist.get_world_size()
    dist.all_gather_object(places, where_this_rank_runs())
    return places


def check_placement(cfg: BenchConfig, places: list[dict]) -> None:
    """Under Slurm the topology assumes block placement: ranks n * per_node .. (n + 1) * per_node - 1 on node n
    (TP groups and the pool's node-level reductions are laid out on that). Raise, naming the ranks, if the
    tasks landed otherwise: by Slurm's node index where the task knows it, and by host in any case."""
    if cfg.launcher.kind != "slurm":
        return
    from harness.preflight import slurm_layout

    _, per_node = slurm_layout(cfg.launcher, len(places))
    hosts = [p["host"] for p in places]
    first_of_node = {r: hosts[r // per_node * per_node] for r in range(len(hosts))}
    wrong = [r for r, p in enumerate(places)
             if p["host"] != first_of_node[r] or p["slurm_node_id"] not in (None, r // per_node)]
    shared = len(set(first_of_node.values())) != len({r // per_node for r in range(len(hosts))})
    if wrong or shared:
        where = ", ".join(f"rank {r}: {p['host']} (node {p['slurm_node_id']})" for r, p in enumerate(places))
        raise RuntimeError(f"ranks {wrong or 'of different nodes'} are not where the topology assumes them, in blocks "
                           f"of {per_node} ranks per node ({where}); the job asks srun for --distribution=block:block, "
                           f"so check SLURM_DISTRIBUTION and the partition's settings")


def _destroy_process_group(timeout_s: float) -> bool:
    """destroy_process_group, bounded: True when it finished within timeout_s."""
    worker = threading.Thread(target=dist.destroy_process_group, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return not worker.is_alive()


def _measure(cfg, cfg_dict, rank, world, device, backend, out_dir):
    w = cfg.workload
    if w.kind == "trace":
        from harness.serving.run import serve

        return serve(cfg, cfg_dict, rank, world, device, backend, out_dir, build_engine, perturb_weights, inject_fault)
    prompts = make_prompts(w, cfg.model.vocab_size)
    max_len = max(len(p) for p in prompts) + w.output_tokens
    timer = PhaseTimer(device, enabled=False)  # off while steps are timed: its synchronizations would serialize
    engine = build_engine(cfg, rank, world, device, timer)
    perturb_weights(engine, cfg.fault, rank)
    warmups = engine.warmup_generations if w.warmup_steps > 0 else 0
    for _ in range(warmups):  # warm caches, allocator, communicators and captured steps; not timed
        generate(engine, prompts, w.warmup_steps + 1, max_len, w.synthetic_kv, w.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine.reset_measurements()
    clock = StepClock(device) if rank == 0 else None
    tokens = generate(engine, prompts, w.output_tokens, max_len, w.synthetic_kv, w.seed, clock, cfg.fault, rank)
    report = engine.report()
    report["comm_bytes_prefill"], report["comm_ops_prefill"] = engine.prefill_comm["bytes"], engine.prefill_comm["ops"]
    report["rank"], report["warmup_generations"] = rank, warmups
    report.update(where_this_rank_runs())
    if device.type == "cuda":
        report["peak_bytes"], report["memory_source"] = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        report["nvml_utilization_pct"] = nvml_utilization()
    else:
        report["peak_bytes"], report["memory_source"] = report["weight_bytes"] + report["kv_bytes"], "tensor bytes held (CPU)"
    elasticity = getattr(engine, "elasticity", [])  # the measured generation's, before the passes below
    # the breakdown: the same generation again with the phase timers on, decode steps only
    engine.reset_measurements()
    timer.enabled = True
    phases = {}
    instrumented = generate(engine, prompts, w.output_tokens, max_len, w.synthetic_kv, w.seed, phases=phases)
    timer.enabled = False
    report.update(phases)
    report["instrumented_tokens_equal"] = None if tokens is None else bool(torch.equal(tokens, instrumented))
    # the kernel timeline of one more (uninstrumented) generation per profiled phase: its decode steps, its prefill
    for wanted, phase, key, steps in ((cfg.profile, DECODE_RANGE, "profile", w.output_tokens - 1),
                                      (cfg.profile_prefill, PREFILL_RANGE, "profile_prefill", 1)):
        if not wanted or device.type != "cuda":
            continue
        engine.reset_measurements()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
        generate(engine, prompts, w.output_tokens, max_len, w.synthetic_kv, w.seed, profiler=prof, profiled=phase)
        report[key] = profile_summary(device_events(prof, after_range=phase), steps)
        if cfg.profile_trace:
            traces = Path(out_dir, "traces")
            traces.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(traces / f"{'' if phase == DECODE_RANGE else 'prefill_'}rank{rank}.json.gz"))
    forced_tokens = None
    if cfg.check_reference:  # after everything measured is taken: the check pass measures nothing
        check, forced_tokens = reference_check(cfg, engine, prompts, max_len, device, rank, world)
        if check is not None:  # only the rank that holds the logits has one
            report["reference_check"] = check
    reports = [None] * world
    dist.gather_object(report, reports if rank == 0 else None, dst=0)
    if rank == 0:
        record = build_record(cfg, cfg_dict, reports, clock.times, prompts, tokens, elasticity, world, backend,
                              forced_tokens)
        write_record(record, out_dir)
    return engine


def build_record(cfg, cfg_dict, reports, step_times, prompts, tokens, elasticity, world, backend,
                 forced_tokens=None) -> RunRecord:
    w = cfg.workload
    ttft = None if w.synthetic_kv else step_times[0]
    metrics = compute_metrics(ttft, step_times[1:], sum(len(p) for p in prompts), w.batch_size, world)
    roles = {}
    for r in reports:
        roles.setdefault(r["role"], []).append(r)
    memory, phase_fractions, utilization = {}, {}, {}
    for role, rs in roles.items():
        memory[role] = {"peak_bytes_max": max(r["peak_bytes"] for r in rs), "weight_bytes_max": max(r["weight_bytes"] for r in rs),
                        "kv_bytes_max": max(r["kv_bytes"] for r in rs), "source": rs[0]["memory_source"]}
        summed = {}
        for r in rs:
            for p, s in r["phase_s"].items():
                summed[p] = summed.get(p, 0.0) + s
        phase_fractions[role] = breakdown(summed)
    for r in roles.get("pool", []):
        utilization[f"rank{r['rank']}"] = pool_utilization(r["phase_s"]["attention"], r["phase_s"]["resource_management"],
                                                           r["wall_s"])
    check = verdict(next((r.pop("reference_check") for r in reports if "reference_check" in r), None), forced_tokens, tokens)
    return RunRecord(
        run_id=run_id(cfg_dict), status="ok", config=cfg_dict,
        env=environment(world, cfg.hardware.device, backend, placement=placement_of(reports)),
        metrics=metrics, step_times_ms=[t * 1e3 for t in step_times[1:]], memory=memory,
        breakdown=phase_fractions, pool_utilization=utilization, ranks=reports, elasticity=elasticity,
        tokens_sha256=hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest() if tokens is not None else None,
        reference_check=check, synthetic_kv=w.synthetic_kv,
        passes={"warmup": f"{reports[0]['warmup_generations']} untimed generation(s) of {w.warmup_steps} decode steps before",
                "timed": "step times and TPOT: phase timers off, CUDA events (CPU: the clock) at step boundaries only, nothing synchronized",
                "breakdown": "phase fractions and pool utilization: a second generation with the phase timers on "
                             "(on CUDA each phase boundary synchronizes the device; CUDA graphs are off in it, so "
                             "graphed strategies show their eager phases), decode steps only",
                "reference_check": "a third, teacher-forced generation" if check else None,
                "profile": "ranks[i].profile: the decode steps of one more generation under torch.profiler"
                           if cfg.profile and cfg.hardware.device == "cuda" else None,
                "profile_prefill": "ranks[i].profile_prefill: the prefill of one more generation under torch.profiler"
                                   if cfg.profile_prefill and cfg.hardware.device == "cuda" else None,
                "instrumented_tokens_equal": reports[0].pop("instrumented_tokens_equal", None)},
    )


def rank_main(cfg_dict, rank, world, init_method, out_dir, plugins=()):
    """A local process's entry: run, and leave the traceback in out_dir for the launcher on failure. On SIGUSR1
    (the launcher's, at a timeout) it writes every thread's Python stack to out_dir/rank<r>.stack: where it hung."""
    stack_file = open(Path(out_dir, f"rank{rank}.stack"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    run_rank_leaving_error(cfg_dict, rank, world, init_method, out_dir, catch=BaseException, plugins=plugins)


def run_rank_leaving_error(cfg_dict, rank, world, init_method, out_dir, local_rank=None, catch=Exception, plugins=()):
    """run_rank; on failure this rank's traceback goes to out_dir/rank<r>.error before the process ends (before
    its peers can fail for want of it), so the launcher can tell the first failure from its consequences.
    catch: what counts as this rank's failure (a Slurm task lets submitit's requeue signals through).
    plugins: modules that register strategy kinds outside harness/strategies/ (strategies.plugin_modules())."""
    # what the process holds by now (the imported modules, torch's among them) is left out of every collection:
    # a rank's collections, and the full one at its end, scan only the objects the run makes
    gc.freeze()
    error = Path(out_dir, f"rank{rank}.error")
    error.unlink(missing_ok=True)  # an earlier attempt's (a requeued job) is not this one's
    try:
        load_plugins(plugins)
        run_rank(cfg_dict, rank, world, init_method, out_dir, local_rank=local_rank)
    except catch:
        where = where_this_rank_runs()
        error.write_text(f"on {where['host']} (Slurm node {where['slurm_node_id']}):\n{traceback.format_exc()}"
                         if where["slurm_node_id"] is not None else traceback.format_exc())
        raise
