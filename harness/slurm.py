"""The Slurm launcher, through submitit: one job per run, one task per rank (per GPU), torch.distributed
set up from Slurm's environment, rank 0 writes the record.

Why submitit directly and not hydra-submitit-launcher: the plugin validates a config only when its job
starts on a compute node, after the queue wait; here `validate()` runs on the submitting machine and a
bad config never reaches the queue. The job still runs the same `run_rank` as the local launcher.

In a multirun every point is submitted first and the sweep waits for all of them at its end
(`wait_all`, called by the multirun callback), so the points queue and run side by side.
A job that fails, is cancelled or outlives `launcher.timeout_s` leaves a `failed`/`timeout` record and
the sweep goes on. Preemption and time-outs requeue the job (submitit's checkpointing); a run that is
re-run writes its record atomically over the same file, so there is never more than one.
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
        run_rank(self.cfg_dict, env.rank, env.world_size, "env://", self.out_dir, local_rank=env.local_rank)
        return env.rank


@dataclass
class Pending:
    job: submitit.Job
    cfg_dict: dict
    out_dir: str
    world: int
    device: str
    deadline: float


PENDING: list[Pending] = []  # submitted by this process and not yet waited for


def executor_for(cfg: BenchConfig, out_dir: str) -> submitit.AutoExecutor:
    L = cfg.launcher
    nodes, per_node = slurm_layout(L, cfg.strategy.world_size)
    folder = L.folder or str(Path(out_dir) / "slurm")
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=L.max_requeues)
    params = dict(slurm_partition=L.partition, nodes=nodes, tasks_per_node=per_node, cpus_per_task=L.cpus_per_task,
                  timeout_min=L.time_min, slurm_setup=list(L.setup),
                  name=f"fapool-{cfg.strategy.name}-{cfg.workload.name}")
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
    job = executor_for(cfg, out_dir).submit(SlurmRun(cfg_dict, out_dir))
    log.info("submitted %s x %s as Slurm job %s", cfg.strategy.name, cfg.workload.name, job.job_id)
    p = Pending(job, cfg_dict, out_dir, cfg.strategy.world_size, cfg.hardware.device,
                time.monotonic() + cfg.launcher.timeout_s)
    PENDING.append(p)
    return p


def wait(p: Pending, poll_s: float = 1.0):
    """Until the job ends or its deadline passes; make sure the run has exactly one record."""
    record = Path(p.out_dir) / "result.json"
    status, error = None, None
    while not p.job.done():
        if time.monotonic() > p.deadline:
            p.job.cancel(check=False)
            status, error = "timeout", (f"Slurm job {p.job.job_id} exceeded launcher.timeout_s; cancelled "
                                        f"(state {p.job.state})")
            break
        time.sleep(poll_s)
    if status is None:
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
