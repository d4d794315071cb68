"""The Slurm path for real: a single-node Slurm cluster on this machine (jobs/local_slurm.sh), multi-task jobs,
torch.distributed across tasks, requeue, and a hung run that ends as a timeout record."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import compose_cfg, run_app, slurm_cluster

pytestmark = [pytest.mark.skipif(shutil.which("slurmctld") is None or os.geteuid() != 0,
                                 reason="needs Debian's slurm-wlm and munge, as root (.ci/run installs them)"),
              # under pytest-xdist one worker runs them all, one after another, on one cluster
              pytest.mark.xdist_group("slurm1")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as conf:
        yield conf


MULTIRUN = ["-m", "launcher=slurm_local", "strategy=tp2_pp1,fa_pool_b2_p2", "workload=tiny_short,tiny_long"]


@pytest.fixture(scope="module")
def multirun(slurm, tmp_path_factory):
    """One sweep of 2 strategies x 2 lengths through Slurm, shared by the tests that assert on it and on its resume.
    The sweeps of this module submit from this process (the command's own process is tests/test_app.py's point);
    their jobs' tasks are new processes, as a user's are."""
    tmp_path = tmp_path_factory.mktemp("multirun")
    proc, records = run_app(MULTIRUN, tmp_path)
    return tmp_path, proc, records


def test_multirun_of_two_strategies_by_two_lengths_through_slurm(multirun):
    tmp_path, proc, records = multirun
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    assert {r["env"]["world_size"] for r in records} == {2, 4}
    assert all(r["env"]["slurm_job_id"] for r in records)  # written inside a Slurm task
    assert len({r["env"]["slurm_job_id"] for r in records}) == 4  # one job per point, all queued at once
    assert "fa_pool_b2_p2" in proc.stdout and "report:" in proc.stdout
    scripts = list(Path(tmp_path).rglob("*_submission.sh"))
    assert len(scripts) == 4 and all("--kill-on-bad-exit=1" in s.read_text() for s in scripts)  # one bad task ends the job


def _job_state(job_id):
    from harness.slurm import job_field

    return job_field(job_id, "JobState"), int(job_field(job_id, "Restarts") or 0)


def requeued_run(overrides, out_dir):
    """Submit one run, requeue its job mid-run (as a preemption does) and wait for it; returns (record, restarts)."""
    from omegaconf import OmegaConf

    from harness import slurm as slurm_launcher

    cfg = compose_cfg(["launcher=slurm_local", "launcher.wait=false", "hydra.mode=RUN", *overrides])
    pending = slurm_launcher.submit(OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True), str(out_dir))
    deadline = time.monotonic() + 120
    # a task leaves the started marker with torch imported, before its rendezvous: the requeue lands well inside the
    # run (the model's build, then 100 decode steps in each of its generations and its check are still ahead)
    while not (Path(out_dir) / slurm_launcher.STARTED).exists():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    assert not (Path(out_dir) / "result.json").exists()
    subprocess.run(["scontrol", "requeue", str(pending.job.job_id)], check=True)
    # Slurm holds a requeued batch job back for 2 minutes; release it now, as an admin would
    while _job_state(pending.job.job_id)[0] != "PENDING":  # the killed attempt first has to leave the nodes
        assert time.monotonic() < deadline + 60
        time.sleep(0.2)
    # slurmd revokes the old attempt's credential at the requeue, to the second: a new attempt started within the
    # same second is refused ("Job credential revoked")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={pending.job.job_id}", "StartTime=now"], check=True)
    rec = slurm_launcher.wait(pending)
    return rec, _job_state(pending.job.job_id)[1]


def test_a_requeued_job_ends_with_exactly_one_record(slurm, tmp_path):
    rec, restarts = requeued_run(["strategy=tp2_pp1", "workload=tiny", "workload.output_tokens=100"], tmp_path)
    assert rec.status == "ok", rec.error
    assert restarts >= 1  # it did restart
    assert len(list(Path(tmp_path).rglob("result.json"))) == 1
    assert not list(Path(tmp_path).glob(".result.json.*"))


def test_a_hung_run_ends_as_timeout_and_the_sweep_goes_on(slurm, tmp_path):
    t0 = time.monotonic()
    # the hung point first: the waiter waits for the jobs in submission order and starts a job's clock when it
    # finds the job started, so the healthy point, which runs meanwhile, is done before its clock starts and the
    # limit can be short (15 s from the task's start marker, which it leaves with torch imported: past the hung
    # rank's model build, reference check and warm-up to its fault step on a loaded machine)
    proc, records = run_app(["-m", "launcher=slurm_local", "strategy=tp2_pp1", "workload=tiny_short",
                             "fault.kind=hang,none", "fault.rank=1", "launcher.timeout_s=15"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # every record written, then a non-zero exit
    by_fault = {r["config"]["fault"]["kind"]: r for r in records}
    assert by_fault["none"]["status"] == "ok"
    assert by_fault["hang"]["status"] == "timeout" and "cancelled" in by_fault["hang"]["error"]
    assert time.monotonic() - t0 < 150
    # the cancelled job is gone from the queue, not left to eat its time limit
    queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout
    assert "RUNNING" not in queue


def test_plan_mode_prints_nodes_and_gpu_hours_and_submits_nothing(slurm, tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    # in this process (nothing is submitted, so no task needs the command's own Python)
    proc, records = run_app(["-m", "experiment=paper_table", "launcher=slurm_a100", "plan=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert records == []
    assert "16 jobs" in proc.stdout and "480 GPUs" in proc.stdout
    assert "| fa_pool    | len16384   | slurm_a100 |       5 |" in proc.stdout
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert set(after.split()) <= set(before.split())  # no new job (earlier ones may have left the queue)


def test_resume_skips_runs_that_already_have_an_ok_record(multirun):
    # the same sweep again over the shared multirun's directory: every point has its ok record, none is submitted
    tmp_path, proc, first = multirun
    assert proc.returncode == 0 and len(first) == 4
    proc, again = run_app(MULTIRUN, tmp_path)
    assert proc.returncode == 0 and proc.stdout.count("submitted") == 0
    assert sorted(r["created_at"] for r in again) == sorted(r["created_at"] for r in first)
