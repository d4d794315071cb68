import compileall
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.app import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent

# Where the environment says not to write bytecode (PYTHONDONTWRITEBYTECODE), every process the tests start (a Slurm
# task, a rank's forkserver, the command itself) would compile the project's modules from source again. The session
# compiles them once into their __pycache__ (ignored by git), which those processes read whatever the variable says.
if sys.flags.dont_write_bytecode:
    for package in ("harness", "model", "tests"):
        compileall.compile_dir(ROOT / package, quiet=1)


def compose_cfg(overrides=()):
    """The resolved config for these overrides, as the app would see it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def cfg_object(overrides=()):
    """The typed config; a field out of its group's range raises ConfigError here, as in the app."""
    from harness.config import load

    return load(compose_cfg(overrides))


def run_cli(args, tmp_path, timeout=300, env=None):
    """Run the fapool-bench command as a user would; returns (completed process, records found). env: variables
    added to this process's environment for it."""
    cmd = [sys.executable, "-m", "harness.app", *args, f"hydra.run.dir={tmp_path}/run",
           f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)
    records = [json.loads(p.read_text()) for p in sorted(Path(tmp_path).rglob("result.json"))]
    return proc, records


def call_app(args, plots=False):
    """The fapool-bench command's entry (harness.app.main, Hydra parsing sys.argv) called in this process with
    these arguments: the same Hydra app, callbacks and exit status as the command, without starting a Python (and
    importing torch) per call. Returns a CompletedProcess with what it printed; the ranks' own output is not in
    it (they are this process's forkserver's children: run the command for that).
    plots: whether a multirun's report draws its plots; by default it writes its tables only (tests/test_report.py
    draws the plots and checks them, and run_cli's command draws them as a user's does)."""
    import io
    import logging
    from unittest import mock

    from hydra.core.global_hydra import GlobalHydra

    from harness import app
    from harness.config import register_configs

    register_configs()  # as the app's import does in a new process: the schemas of every kind registered by now
    argv = ["fapool-bench", *args]
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    old_argv, code = sys.argv, 0
    GlobalHydra.instance().clear()
    no_plots = contextlib.ExitStack()
    if not plots:
        from harness import report

        no_plots.enter_context(mock.patch.object(report, "plot_all", lambda *a, **k: []))
        no_plots.enter_context(mock.patch.object(report, "plot_serving", lambda *a, **k: []))
    try:
        sys.argv = argv
        with no_plots, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        GlobalHydra.instance().clear()
        for h in root.handlers[:]:  # Hydra's job logging (console and file handlers) goes with the call
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
        for name, lg in logging.root.manager.loggerDict.items():  # plan=true quiets Hydra's launcher log, say
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(name, logging.NOTSET))
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_app(args, tmp_path, env=None):
    """run_cli's call through call_app, in this process: (a CompletedProcess, records found). As run_cli's command,
    it runs from the repository's root, env's variables added to the environment (which a Slurm job's submission
    passes on to its tasks) while it runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        proc = call_app([*args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"])
    records = [json.loads(p.read_text()) for p in sorted(Path(tmp_path).rglob("result.json"))]
    return proc, records


# Modules whose tests wait longest (a Slurm cluster's queue, timeouts, multi-process runs), started first.
LONG_FIRST = ("test_slurm_multinode.py", "test_slurm.py", "test_faults.py", "test_fa_pool_ops.py", "test_app.py")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n`), the longest tests first: workers take tests in collection order, and a long test
    started last would run on alone after the others are done. A serial run keeps pytest's order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item):
        name = item.path.name
        if name in LONG_FIRST:
            return LONG_FIRST.index(name)
        return len(LONG_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: a module's tests stay in their order


@pytest.fixture
def compose_config():
    return compose_cfg


def launch(overrides, out_dir):
    """Compose, validate and run one config on the local launcher; returns the record (a dict)."""
    from harness.app import run

    rec = run(compose_cfg(overrides), str(out_dir))
    return json.loads((Path(out_dir) / "result.json").read_text()) if rec else None


@contextlib.contextmanager
def slurm_cluster(state_dir, nodes: int = 1):
    """A Slurm cluster of `nodes` (emulated when more than one) from jobs/local_slurm.sh, SLURM_CONF set for this
    process while it runs; stopped afterwards whatever happened. Yields its config path."""
    script = str(ROOT / "jobs" / "local_slurm.sh")
    out = subprocess.run(["bash", script, "start", str(state_dir), str(nodes)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = out.stdout.strip().split("=", 1)[1]
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        subprocess.run(["bash", script, "stop", str(state_dir)])
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
