import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.app import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(overrides=()):
    """The resolved config for these overrides, as the app would see it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def cfg_object(overrides=()):
    """The typed config; a field out of its group's range raises ConfigError here, as in the app."""
    from harness.config import load

    return load(compose_cfg(overrides))


def run_cli(args, tmp_path, timeout=300):
    """Run the fapool-bench command as a user would; returns (completed process, records found)."""
    cmd = [sys.executable, "-m", "harness.app", *args, f"hydra.run.dir={tmp_path}/run",
           f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    records = [json.loads(p.read_text()) for p in sorted(Path(tmp_path).rglob("result.json"))]
    return proc, records


@pytest.fixture
def compose_config():
    return compose_cfg


def launch(overrides, out_dir):
    """Compose, validate and run one config on the local launcher; returns the record (a dict)."""
    from harness.app import run

    rec = run(compose_cfg(overrides), str(out_dir))
    return json.loads((Path(out_dir) / "result.json").read_text()) if rec else None
