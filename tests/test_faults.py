"""Faults end as records within the timeout, the other ranks are torn down, a sweep goes on, and records
are never corrupted by many writers."""
import json
import time
from pathlib import Path

import pytest

from harness.collect import collect
from harness.launch import forkserver
from tests.conftest import launch, run_app
from tests.record_writers import write_many

TIMEOUT_S = 30  # the launcher's limit in these tests: a raise or kill ends well inside it with -n 4 on 2 cores
# the hung run's limit: it waits all of it out, and needs only the ranks' start from the forkserver, the tiny
# model's prefill and two decode steps to reach its fault step first
HANG_TIMEOUT_S = 15


@pytest.mark.parametrize("kind,status,needle", [
    ("raise", "failed", "injected fault: rank 1 raised at decode step 2"),
    ("kill", "failed", "rank 1 exited with code -9"),
    ("hang", "timeout", f"exceeded launcher.timeout_s={HANG_TIMEOUT_S}"),
])
def test_injected_fault_ends_as_a_record_within_the_timeout(kind, status, needle, tmp_path):
    timeout_s = HANG_TIMEOUT_S if kind == "hang" else TIMEOUT_S
    t0 = time.monotonic()
    rec = launch(["strategy=tp2_pp2", "workload=tiny", f"fault.kind={kind}", "fault.rank=1", "fault.step=2",
                  f"launcher.timeout_s={timeout_s}"], tmp_path)
    elapsed = time.monotonic() - t0
    assert rec["status"] == status and needle in rec["error"], rec["error"]
    assert rec["metrics"] == {} and rec["step_times_ms"] == []
    # raise/kill end as soon as the launcher sees the exit; hang ends at the timeout plus the teardown
    assert elapsed < timeout_s + 30, elapsed
    if kind != "hang":
        assert elapsed < TIMEOUT_S, elapsed
    else:  # the record says where each rank hung: rank 1 in the injected sleep, the others waiting on it
        assert "[rank 1 stack]" in rec["error"] and "in inject_fault" in rec["error"], rec["error"]
        assert "[rank 0 stack]" in rec["error"] and "in decode_steps" in rec["error"], rec["error"]
    leftovers = [p for p in Path(tmp_path).iterdir() if p.name.startswith(".result.json")]
    assert leftovers == []  # no temporary half-written record


def test_a_sweep_goes_on_after_a_hung_run(tmp_path):
    # the second point hangs; the first and third still run and the sweep ends with three records (10 s: the hung
    # point's ranks, forked from the forkserver, reach its fault at decode step 1 well inside it)
    proc, records = run_app(["-m", "strategy=tp2_pp1", "workload=tiny_short", "fault.kind=none,hang,none",
                             "fault.rank=1", "launcher.timeout_s=10"], tmp_path)
    assert proc.returncode == 1, proc.stderr  # the sweep ends, then says that a point failed
    assert "exit status 1" in proc.stdout
    by_fault = sorted((r["config"]["fault"]["kind"], r["status"]) for r in records)
    assert by_fault == [("hang", "timeout"), ("none", "ok"), ("none", "ok")]
    assert "timeout" in proc.stdout  # the comparison table lists the failed point too


def test_sixteen_concurrent_writers_leave_sixteen_whole_records(tmp_path):
    ctx = forkserver()  # sixteen processes forked from the launcher's forkserver, not sixteen fresh Pythons
    procs = [ctx.Process(target=write_many, args=(str(tmp_path), w, 20)) for w in range(16)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    df, bad = collect(tmp_path)
    assert bad == []
    assert len(df) == 17  # 16 per-task records + the shared one, which is one writer's whole record
    shared = json.loads((tmp_path / "shared" / "result.json").read_text())
    assert shared["config"]["i"] == 19 and len(shared["step_times_ms"]) == 200
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_hanging_process_group_teardown_is_bounded(monkeypatch):
    """destroy_process_group can hang after CUDA graphs captured NCCL work (pytorch/pytorch#115388); the rank's
    teardown gives up after its bound instead of hanging the run (harness/runner.py)."""
    import torch.distributed as dist

    from harness import runner

    monkeypatch.setattr(dist, "destroy_process_group", lambda: time.sleep(5))
    t0 = time.monotonic()
    assert runner._destroy_process_group(0.2) is False
    assert time.monotonic() - t0 < 2
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    assert runner._destroy_process_group(0.2) is True


def test_the_first_failure_is_named_as_the_cause_and_the_peers_errors_as_consequences(tmp_path):
    import os

    from harness.launch import describe_rank_failures

    def leave(rank, text, at):
        f = tmp_path / f"rank{rank}.error"
        f.write_text(text)
        os.utime(f, (at, at))

    # rank 0's consequence was written first, yet the cause is rank 2's own error
    leave(0, "Traceback ...\nRuntimeError: [gloo] Connection closed by peer [10.0.0.2]:1234", 100.0)
    leave(2, "on node2 (Slurm node 1):\nTraceback ...\nRuntimeError: injected fault: rank 2 raised", 101.0)
    leave(3, "Traceback ...\nRuntimeError: [gloo] Connection reset by peer", 102.0)
    text = describe_rank_failures(tmp_path, range(4), lambda r: f"rank {r} left nothing")
    assert text.startswith("rank 2 failed first: RuntimeError: injected fault: rank 2 raised"), text
    assert "[rank 0, a consequence] RuntimeError: [gloo] Connection closed by peer" in text
    assert "[rank 3, a consequence]" in text and "[rank 1] rank 1 left nothing" in text
    # two errors of their own: the earlier is the cause
    leave(1, "Traceback ...\nValueError: bad shape", 99.0)
    assert describe_rank_failures(tmp_path, range(4), str).startswith("rank 1 failed first: ValueError: bad shape")
    # only consequences, and a rank that left nothing (killed): that rank leads
    for r in (1, 2):
        (tmp_path / f"rank{r}.error").unlink()
    text = describe_rank_failures(tmp_path, range(4), lambda r: f"rank {r} was killed")
    assert text.splitlines()[:2] == ["rank 1: rank 1 was killed", "rank 2: rank 2 was killed"], text
