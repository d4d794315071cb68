"""The target of the concurrent-writer processes of tests/test_faults.py, in a module of its own: a process the
forkserver starts imports the module its target lives in, and this one imports only harness.record (light), not
the test module's pandas and Hydra."""
from pathlib import Path

from harness.record import RunRecord, write_record


def write_many(directory: str, writer: int, n: int):
    for i in range(n):
        rec = RunRecord(run_id=f"w{writer}", status="ok", config={"writer": writer, "i": i},
                        metrics={"mean_tpot_ms": float(i)}, step_times_ms=[1.0] * 200)
        write_record(rec, Path(directory) / f"task{writer}")
        write_record(rec, Path(directory) / "shared")  # all writers race on the same file too
