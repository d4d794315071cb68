"""Launching a run: the local launcher starts one process per rank on this machine, watches them,
and turns a crash, a kill or a hang into a failed/timeout record instead of a hung sweep."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import signal
import socket
import time
from pathlib import Path

from harness.record import RunRecord, environment, run_id, write_record
from harness.strategies import plugin_modules

log = logging.getLogger("fapool.launch")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports free on `host` now: each socket stays bound until all are picked, so that the
    system cannot hand out one port twice (""; every interface)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (a rendezvous for torch.distributed's tcp:// init)."""
    return free_ports(1, host)[0]


def forkserver():
    """The multiprocessing context that rank processes start from: a forkserver, a clean process (no inherited
    threads or CUDA state) that has torch imported once, so that starting 8 ranks does not import torch 8 times.
    One per process: the first caller starts it, later ones reuse it."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "numpy", "harness.runner", *engine_modules()])
    return ctx


def engine_modules() -> list[str]:
    """Every module of model/parallel (the engines and what they share): imported once in the forkserver rather
    than in each rank, where a fresh import (compiled from source where bytecode is not written) would add to every
    rank's start."""
    import pkgutil

    import model.parallel

    return [f"model.parallel.{m.name}" for m in pkgutil.iter_modules(model.parallel.__path__)]


def failure_record(cfg_dict: dict, status: str, error: str, world: int, device: str, **where) -> RunRecord:
    return RunRecord(run_id=run_id(cfg_dict), status=status, config=cfg_dict, error=error,
                     env=environment(world, device, **where))


def record_failure(cfg_dict: dict, status: str, error: str, world: int, device: str, out_dir: str | Path,
                   **where) -> Path:
    """Write the run's record of a failure (atomically replacing any partial one); CUDA's out-of-memory
    error makes a failed or timed-out run `oom`. where: `placement` and `slurm_job_id` for the record's env, when
    the writer is not where the run ran (a Slurm job's submitter)."""
    if status in ("failed", "timeout") and ("CUDA out of memory" in error or "OutOfMemoryError" in error):
        status = "oom"
    log.error("run %s: %s", status, error.strip().splitlines()[-1] if error.strip() else "")
    return write_record(failure_record(cfg_dict, status, error, world, device, **where), out_dir)


# What a rank raises when a peer died before it: the peer's error is the cause, this one a consequence.
CONSEQUENCE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|communicator was aborted|"
                         r"watchdog|DistNetworkError|DistBackendError|Socket Timeout|failed to recv|"
                         r"NCCL error.*remote process exited", re.IGNORECASE)


def describe_rank_failures(out_dir: Path, ranks, without_error) -> str:
    """The failed ranks' errors (out_dir/rank<r>.error, see runner.run_rank_leaving_error), the cause first: the
    earliest error that is not a peer's consequence (a closed connection, an aborted communicator), else the
    earliest; then the others, marked as consequences. without_error(r): what to say of a rank that left none."""
    files = {r: out_dir / f"rank{r}.error" for r in ranks}
    errors = {r: f.read_text().strip() for r, f in files.items() if f.exists()}
    if not errors:
        return "\n".join(without_error(r) for r in ranks)
    consequence = {r: bool(CONSEQUENCE.search(text)) for r, text in errors.items()}
    order = sorted(errors, key=lambda r: (consequence[r], files[r].stat().st_mtime))
    silent = [r for r in ranks if r not in errors]
    if consequence[order[0]] and silent:  # no rank raised on its own: a silent one died first
        parts = [f"rank {r}: {without_error(r)}" for r in silent]
        parts += [f"[rank {r}, a consequence] {_last_line(errors[r])}" for r in order]
        return "\n".join(parts)
    cause = order[0]
    parts = [f"rank {cause} failed first: {_last_line(errors[cause])}\n[rank {cause}] {errors[cause]}"]
    parts += [f"[rank {r}, a consequence] {_last_line(errors[r])}" for r in order[1:]]
    parts += [f"[rank {r}] {without_error(r)}" for r in silent]
    return "\n".join(parts)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def launch_local(cfg_dict: dict, world: int, out_dir: str | Path, timeout_s: float, device: str = "cpu") -> Path:
    """Start `world` rank processes (spawned), wait up to timeout_s, and make sure a record exists."""
    from harness.runner import rank_main

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / "result.json"
    result.unlink(missing_ok=True)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = forkserver()
    plugins = plugin_modules()
    procs = [ctx.Process(target=rank_main, args=(cfg_dict, r, world, init_method, str(out_dir), plugins), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    status, error = "ok", None
    while any(p.is_alive() for p in procs):
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            status, error = "failed", _rank_errors(out_dir, procs, failed)
            break
        if time.monotonic() > deadline:
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            status, error = "timeout", f"run exceeded launcher.timeout_s={timeout_s}s; ranks still running: " + \
                ", ".join(map(str, hung)) + _stacks(out_dir, procs, hung)
            break
        time.sleep(0.05)
    for p in procs:  # tear down the others: a rank waiting on a dead peer would hang forever
        if p.is_alive():
            p.kill()
        p.join()
    if status == "ok":
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            status, error = "failed", _rank_errors(out_dir, procs, failed)
        elif not result.exists():
            status, error = "failed", "all ranks exited cleanly but rank 0 wrote no result.json"
    if status != "ok":
        record_failure(cfg_dict, status, error, world, device, out_dir)
    return result


def _stacks(out_dir: Path, procs, ranks) -> str:
    """Where the hung ranks are: each writes its Python stacks on SIGUSR1 (harness/runner.rank_main)."""
    for r in ranks:
        os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(1.0)
    parts = []
    for r in ranks:
        f = out_dir / f"rank{r}.stack"
        text = f.read_text().strip() if f.exists() else ""
        parts.append(f"\n[rank {r} stack]\n{text or '(none written)'}")
    return "".join(parts)


def _rank_errors(out_dir: Path, procs, failed) -> str:
    return describe_rank_failures(out_dir, failed, lambda r: f"rank {r} exited with code {procs[r].exitcode} "
                                                             f"(no traceback: killed?)")
