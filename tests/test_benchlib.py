"""harness/benchlib.py (what the benchmarks share) and harness/record.device_environment (their device line)."""
from harness.benchlib import describe_device, md_table, timeit, timeit_fixed
from harness.record import device_environment, environment


def test_timeit_gives_seconds_after_a_fixed_number_of_calls():
    """The number of calls depends on nothing measured (timeit_fixed: a collective's ranks call it as often)."""
    counts = []
    for timer in (timeit, timeit, timeit_fixed):
        calls = []
        assert timer(lambda: calls.append(1), reps=5, warmup=2) > 0
        counts.append(len(calls))
    assert counts[0] == counts[1] == counts[2] >= 7


def test_md_table_leaves_out_errors_and_formats_floats():
    rows = [{"run": "reference", "context": 8192, "tpot_ms": 12.3456}, {"run": "tp2", "error": "refused"},
            {"run": "tp4", "context": 8192, "tpot_ms": None}]
    lines = md_table(rows, ["run", "context", "tpot_ms"]).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["run", "context", "tpot_ms"] and len(lines) == 4  # header, rule, two rows
    assert cells[2] == ["reference", "8192", "12.3"] and cells[3] == ["tp4", "8192", ""]


def test_device_environment_names_the_versions():
    cpu = device_environment("cpu")
    assert {"device", "device_name", "python", "torch", "triton"} <= set(cpu) and cpu["device"] == "cpu"
    env = environment(2, "cpu", "gloo")
    assert env["torch"] == cpu["torch"] and env["world_size"] == 2 and "device_name" not in env
    gpu = {"device": "cuda:0", "device_name": "NVIDIA H100", "driver": "550.54", "cuda": "12.4", "torch": "2.5.1",
           "nccl": "2.21.5", "triton": "3.1.0"}
    assert describe_device(gpu) == "NVIDIA H100 (driver 550.54, CUDA 12.4, torch 2.5.1, NCCL 2.21.5, Triton 3.1.0)"
