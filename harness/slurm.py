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
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from harness.config import BenchConfig
from harness.preflight import slurm_layout
from harness.launch import describe_rank_failures, record_failure
from harness.record import read_record
from harness.strategies import plugin_modules

log = logging.getLogger("fapool.slurm")


class SlurmRun(submitit.helpers.Checkpointable):
    """What each Slurm task runs. Checkpointable: on preemption or time-out submitit requeues it as is."""

    def __init__(self, cfg_dict: dict, out_dir: str, plugins=()):
        self.cfg_dict, self.out_dir, self.plugins = cfg_dict, out_dir, tuple(plugins)

    def __call__(self):
        from harness.runner import run_rank_leaving_error

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        Path(self.out_dir, STARTED).touch()  # the waiter's clock starts here, not at submission
        run_rank_leaving_error(self.cfg_dict, env.rank, env.world_size, "env://", self.out_dir, local_rank=env.local_rank,
                               plugins=self.plugins)
        return env.rank


@dataclass
class Pending:
    job: submitit.Job
    cfg_dict: dict
    out_dir: str
    world: int
    device: str
    timeout_s: float  # from the job's start
    pending: list | None = field(default=None, compare=False, repr=False)  # the sweep's list it is in until waited for


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


def submit(cfg: BenchConfig, cfg_dict: dict, out_dir: str, pending: list | None = None) -> Pending:
    """Submit one run's job; `pending` (a sweep's list, harness/plan.Sweep) holds it until `wait` ends it."""
    for stale in (STARTED, "result.json", *(f.name for f in Path(out_dir).glob("rank*.error"))):
        Path(out_dir, stale).unlink(missing_ok=True)  # an earlier run's marker, record or errors are not this run's
    job = executor_for(cfg, out_dir).submit(SlurmRun(cfg_dict, out_dir, plugin_modules()))
    log.info("submitted %s x %s as Slurm job %s", cfg.strategy.name, cfg.workload.name, job.job_id)
    p = Pending(job, cfg_dict, out_dir, cfg.strategy.world_size, cfg.hardware.device, cfg.launcher.timeout_s, pending)
    if pending is not None:
        pending.append(p)
    return p


def wait(p: Pending, poll_s: float = 1.0):
    """Until the job ends or its deadline passes; make sure the run has exactly one record."""
    record, marker = Path(p.out_dir) / "result.json", Path(p.out_dir) / STARTED
    status, error, started = None, None, None
    ended = JobEnd(p.job)
    while not ended():
        if started is None and marker.exists():
            started = time.monotonic()
        if started is not None and time.monotonic() - started > p.timeout_s:
            p.job.cancel(check=False)
            status, error = "timeout", (f"Slurm job {p.job.job_id} exceeded launcher.timeout_s={p.timeout_s}s after it "
                                        f"started; cancelled")
            _wait_until_ended(ended, poll_s)
            if _ok_record(record):  # it finished while being cancelled: the run's own record stands
                status = None
            break
        time.sleep(poll_s)
    if status is None and not _ok_record(record):
        if not p.job.done():  # Slurm ended it, but task 0 left no result (killed when another task failed)
            reason = job_field(p.job.job_id, "Reason")
            status, error = "failed", (f"Slurm job {p.job.job_id} ({ended.state}"
                                       f"{', reason ' + reason if reason and reason != 'None' else ''}): "
                                       f"{_task_errors(p, None)}")
        else:
            try:
                p.job.results()  # every task's return value; raises with the failing task's error
            except Exception as e:  # noqa: BLE001 - any failure of the job becomes the record's error
                status, error = "failed", f"Slurm job {p.job.job_id} ({ended.state or p.job.state}): {_task_errors(p, e)}"
            else:
                if not record.exists():
                    status, error = "failed", f"Slurm job {p.job.job_id} ended without a result.json from rank 0"
    if status is not None:
        # written here, on the submitter: the record names the job and its nodes, not this machine
        record_failure(p.cfg_dict, status, error, p.world, p.device, p.out_dir, slurm_job_id=str(p.job.job_id),
                       placement={"hosts": job_hosts(p.job.job_id) or []})
    if p.pending is not None and p in p.pending:
        p.pending.remove(p)
    return read_record(record)


ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class JobEnd:
    """Whether a job has ended: submitit's answer (task 0's result file, or sacct), else the controller's own
    (`scontrol show job`, asked at most every `every_s`): without Slurm accounting sacct fails, and a job whose
    task 0 was killed leaves no result file, so submitit alone would call it running until its time limit."""

    def __init__(self, job, every_s: float = 3.0):
        self.job, self.every_s, self.asked, self.state = job, every_s, -every_s, None

    def __call__(self) -> bool:
        if self.job.done():
            return True
        if time.monotonic() - self.asked >= self.every_s:
            self.asked = time.monotonic()
            self.state = job_field(self.job.job_id, "JobState")
        return self.state in ENDED_STATES


def _task_errors(p: Pending, job_error: Exception | None) -> str:
    """The tasks' own errors, the first failure named as the cause (launch.describe_rank_failures), with the Slurm
    log of each task that left none; submitit's error (the lowest failed task's) when no task left one."""
    out, logs = Path(p.out_dir), Path(p.job.paths.folder)
    if job_error is not None and not list(out.glob("rank*.error")):
        return str(job_error)
    return describe_rank_failures(out, range(p.world), lambda r: (
        f"no error written (killed, or ended by Slurm when another task failed); its log: "
        f"{logs / f'{p.job.job_id}_{r}_log.err'}"))


def job_field(job_id, name: str) -> str | None:
    """One field of `scontrol show job` (None when Slurm does not know the job, or no scontrol answers)."""
    try:
        info = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((kv.split("=", 1)[1] for kv in info.split() if kv.startswith(f"{name}=")), None)


def job_hosts(job_id) -> list[str] | None:
    """The hosts Slurm gave a job, in node order (None when Slurm no longer knows the job)."""
    nodelist = job_field(job_id, "NodeList")
    if not nodelist or nodelist == "(null)":
        return None
    try:
        names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return names or None


def _ok_record(path: Path) -> bool:
    try:
        return read_record(path).status == "ok"
    except (OSError, ValueError, TypeError):
        return False


def _wait_until_ended(ended: JobEnd, poll_s: float) -> None:
    deadline = time.monotonic() + CANCEL_GRACE_S
    while not ended() and time.monotonic() < deadline:
        time.sleep(poll_s)


def wait_all(pending: list) -> list:
    """Wait for every job of a sweep's pending list; returns their records."""
    return [wait(p) for p in list(pending)]


def launch_slurm(cfg: BenchConfig, cfg_dict: dict, out_dir: str, pending: list | None = None):
    """Submit; wait unless the launcher says not to (a multirun waits for all of `pending` at its end)."""
    try:
        p = submit(cfg, cfg_dict, out_dir, pending)
    except Exception as e:  # noqa: BLE001 - sbatch refused (no such partition, no Slurm here...): a record says so
        return read_record(record_failure(cfg_dict, "failed", f"Slurm submission failed: {type(e).__name__}: {e}",
                                          cfg.strategy.world_size, cfg.hardware.device, out_dir,
                                          placement={"hosts": []}))  # it ran nowhere
    if cfg.launcher.wait:
        return wait(p)
    return None
