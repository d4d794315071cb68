"""The Slurm launcher, through submitit: one job per run, one task per rank (per GPU), torch.distributed
set up from Slurm's environment, rank 0 writes the record.

Why submitit directly and not hydra-submitit-launcher: the plugin validates a config only when its job
starts on a compute node, after the queue wait; here `validate()` runs on the submitting machine and a
bad config never reaches the queue. The job still runs the same `run_rank` as the local launcher.

In a multirun every point is submitted first and the sweep waits for all of them at its end
(`wait_all`, called by the multirun callback), so the points queue and run side by side.
A job that fails, is cancelled or outlives `launcher.timeout_s` leaves a `failed`/`timeout` record and
the sweep goes on. `launcher.timeout_s` counts from the job's start (the first task leaves a `started`
marker), not from submission: a 40-GPU job may wait in the queue far longer than it runs. A job past its time
is cancelled, and its record is written only once the job has ended, so the timeout record never races an
`ok` record that rank 0 was writing; if the run finished meanwhile, its record stands. Preemption and
time-outs requeue the job (submitit's checkpointing); a run that is re-run writes its record atomically over
the same file, so there is never more than one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from harness.config import BenchConfig, slurm_layout
from harness.launch import record_failure
from harness.record import read_record

log = logging.getLogger("fapool.slurm")


class SlurmRun(submitit.helpers.Checkpointable):
    """What each Slurm task runs. Checkpointable: on preemption or time-out submitit requeues it as is."""

    def __init__(self, cfg_dict: dict, out_dir: str):
        self.cfg_dict, self.out_dir = cfg_dict, out_dir

    def __call__(self):
        from harness.runner import run_rank

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        Path(self.out_dir, STARTED).touch()  # the waiter's clock starts here, not at submission
        run_rank(self.cfg_dict, env.rank, env.world_size, "env://", self.out_dir, local_rank=env.local_rank)
        return env.rank


@dataclass
class Pending:
    job: submitit.Job
    cfg_dict: dict
    out_dir: str
    world: int
    device: str
    timeout_s: float  # from the job's start


PENDING: list[Pending] = []  # submitted by this process and not yet waited for
STARTED = "started"  # marker a job's tasks leave in the run directory when they start
CANCEL_GRACE_S = 60.0  # how long a cancelled job may take to end before its record is written anyway


def executor_for(cfg: BenchConfig, out_dir: str) -> submitit.AutoExecutor:
    L = cfg.launcher
    nodes, per_node = slurm_layout(L, cfg.strategy.world_size)
    folder = L.folder or str(Path(out_dir) / "slurm")
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=L.max_requeues)
    params = dict(slurm_partition=L.partition, nodes=nodes, tasks_per_node=per_node, cpus_per_task=L.cpus_per_task,
                  timeout_min=L.time_min, slurm_setup=list(L.setup),
                  name=f"fapool-{cfg.strategy.name}-{cfg.workload.name}",
                  # a task that exits with an error ends the job's other tasks, which would otherwise wait for it in
                  # a rendezvous or a collective until their timeout (seen: one rank's port in use at startup)
                  # block placement, which the topology assumes (node n holds ranks n * per_node ..), whatever
                  # SLURM_DISTRIBUTION the submitter's environment passes on; run_rank checks it
                  slurm_srun_args=["--kill-on-bad-exit=1", "--distribution=block:block"])
    if cfg.hardware.device == "cuda":
        params["gpus_per_node"] = per_node
    if L.mem_gb:
        params["mem_gb"] = L.mem_gb
    for key, value in (("slurm_account", L.account), ("slurm_qos", L.qos), ("slurm_constraint", L.constraint)):
        if value:
            params[key] = value
    ex.update_parameters(**params)
    return ex


def submit(cfg: BenchConfig, cfg_dict: dict, out_dir: str) -> Pending:
    for stale in (STARTED, "result.json"):  # an earlier run's marker or record is not this run's
        Path(out_dir, stale).unlink(missing_ok=True)
    job = executor_for(cfg, out_dir).submit(SlurmRun(cfg_dict, out_dir))
    log.info("submitted %s x %s as Slurm job %s", cfg.strategy.name, cfg.workload.name, job.job_id)
    p = Pending(job, cfg_dict, out_dir, cfg.strategy.world_size, cfg.hardware.device, cfg.launcher.timeout_s)
    PENDING.append(p)
    return p


def wait(p: Pending, poll_s: float = 1.0):
    """Until the job ends or its deadline passes; make sure the run has exactly one record."""
    record, marker = Path(p.out_dir) / "result.json", Path(p.out_dir) / STARTED
    status, error, started = None, None, None
    while not p.job.done():
        if started is None and marker.exists():
            started = time.monotonic()
        if started is not None and time.monotonic() - started > p.timeout_s:
            p.job.cancel(check=False)
            status, error = "timeout", (f"Slurm job {p.job.job_id} exceeded launcher.timeout_s={p.timeout_s}s after it "
                                        f"started; cancelled (state {p.job.state})")
            _wait_until_ended(p.job, poll_s)
            if _ok_record(record):  # it finished while being cancelled: the run's own record stands
                status = None
            break
        time.sleep(poll_s)
    if status is None and not _ok_record(record):
        try:
            p.job.results()  # every task's return value; raises with the failing task's error
        except Exception as e:  # noqa: BLE001 - any failure of the job becomes the record's error
            status, error = "failed", f"Slurm job {p.job.job_id} ({p.job.state}): {e}"
        else:
            if not record.exists():
                status, error = "failed", f"Slurm job {p.job.job_id} ended without a result.json from rank 0"
    if status is not None:
        record_failure(p.cfg_dict, status, error, p.world, p.device, p.out_dir)
    if p in PENDING:
        PENDING.remove(p)
    return read_record(record)


def _ok_record(path: Path) -> bool:
    try:
        return read_record(path).status == "ok"
    except (OSError, ValueError, TypeError):
        return False


def _wait_until_ended(job, poll_s: float) -> None:
    deadline = time.monotonic() + CANCEL_GRACE_S
    while not job.done() and time.monotonic() < deadline:
        time.sleep(poll_s)


def wait_all():
    """Wait for every job this process submitted; returns their records."""
    return [wait(p) for p in list(PENDING)]


def launch_slurm(cfg: BenchConfig, cfg_dict: dict, out_dir: str):
    """Submit; wait unless the launcher says not to (a multirun waits for all jobs at its end)."""
    try:
        p = submit(cfg, cfg_dict, out_dir)
    except Exception as e:  # noqa: BLE001 - sbatch refused (no such partition, no Slurm here...): a record says so
        return read_record(record_failure(cfg_dict, "failed", f"Slurm submission failed: {type(e).__name__}: {e}",
                                          cfg.strategy.world_size, cfg.hardware.device, out_dir))
    if cfg.launcher.wait:
        return wait(p)
    return None
