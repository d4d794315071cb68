"""The Slurm waiter's clock and its cancel, against a scripted job (no Slurm needed): launcher.timeout_s counts
from the job's start, and a timeout record never replaces the ok record of a run that finished meanwhile."""
import time

from harness.record import RunRecord, read_record, run_id, write_record
from harness.slurm import STARTED, Pending, wait

CFG = {"strategy": {"name": "t"}, "workload": {"name": "w"}}


class ScriptedJob:
    """start_s: when the tasks start (the marker appears); finish_s: when rank 0 writes an ok record and the job
    ends (None: never, it hangs); a cancel ends it cancel_takes_s later, writing `on_cancel` first if given."""

    job_id = "42"

    def __init__(self, out_dir, start_s, finish_s, cancel_takes_s=0.05, ok_while_cancelling=False):
        self.out, self.t0 = out_dir, time.monotonic()
        self.start_s, self.finish_s, self.cancel_takes_s = start_s, finish_s, cancel_takes_s
        self.ok_while_cancelling, self.cancelled_at = ok_while_cancelling, None

    def _ok(self):
        if not (self.out / "result.json").exists():
            write_record(RunRecord(run_id=run_id(CFG), status="ok", config=CFG), self.out)

    def done(self) -> bool:
        t = time.monotonic() - self.t0
        if t >= self.start_s:
            (self.out / STARTED).touch()
        if self.cancelled_at is not None:
            if time.monotonic() - self.cancelled_at >= self.cancel_takes_s:
                if self.ok_while_cancelling:
                    self._ok()
                return True
            return False
        if self.finish_s is not None and t >= self.finish_s:
            self._ok()
            return True
        return False

    @property
    def state(self):
        return "CANCELLED" if self.cancelled_at else "RUNNING"

    def cancel(self, check=False):
        self.cancelled_at = time.monotonic()

    def results(self):
        return [0]


def pending(job, out_dir, timeout_s):
    return Pending(job, CFG, str(out_dir), 1, "cpu", timeout_s)


def test_a_long_queue_wait_does_not_count_against_the_time_limit(tmp_path):
    job = ScriptedJob(tmp_path, start_s=1.0, finish_s=1.3)  # queued 1 s, runs 0.3 s; limit 0.6 s
    rec = wait(pending(job, tmp_path, timeout_s=0.6), poll_s=0.02)
    assert rec.status == "ok" and job.cancelled_at is None


def test_a_run_past_its_limit_after_start_is_cancelled_and_recorded_as_timeout(tmp_path):
    job = ScriptedJob(tmp_path, start_s=0.3, finish_s=None)  # starts, then hangs
    t0 = time.monotonic()
    rec = wait(pending(job, tmp_path, timeout_s=0.5), poll_s=0.02)
    assert rec.status == "timeout" and "after it started" in rec.error
    assert job.cancelled_at - t0 >= 0.3 + 0.5 - 0.05  # the clock started at the marker, not at submission


def test_a_run_that_finishes_while_being_cancelled_keeps_its_ok_record(tmp_path):
    job = ScriptedJob(tmp_path, start_s=0.0, finish_s=None, cancel_takes_s=0.2, ok_while_cancelling=True)
    rec = wait(pending(job, tmp_path, timeout_s=0.3), poll_s=0.02)
    assert job.cancelled_at is not None
    assert rec.status == "ok" and read_record(tmp_path / "result.json").status == "ok"
