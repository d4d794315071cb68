"""The result record: one dataclass for every strategy, written atomically as result.json."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SCHEMA_VERSION = 2  # 2: the `serving` field (trace replays); version 1 records load unchanged
READABLE_VERSIONS = (1, 2)
STATUSES = ("ok", "failed", "oom", "timeout", "invalid")


@dataclass
class RunRecord:
    run_id: str  # hash of the resolved config: the same config gives the same id
    status: str  # ok | failed | oom | timeout | invalid
    config: dict  # the resolved config
    error: Optional[str] = None
    env: dict = field(default_factory=dict)  # hosts, device, versions, world size, Slurm job, git commit
    metrics: dict = field(default_factory=dict)  # see harness.measure.compute_metrics; empty unless ok
    step_times_ms: list = field(default_factory=list)  # every measured decode step
    memory: dict = field(default_factory=dict)  # per role: peak bytes and how they were taken
    breakdown: dict = field(default_factory=dict)  # per role: phase fractions summing to 1
    pool_utilization: dict = field(default_factory=dict)  # per pool rank: busy / wall
    ranks: list = field(default_factory=list)  # per rank: role, bytes held, phase seconds, bytes sent
    elasticity: list = field(default_factory=list)  # per step: pool ranks per sequence, blocks
    tokens_sha256: Optional[str] = None  # hash of the generated token ids
    reference_check: Optional[dict] = None  # max abs logit error and token equality vs one device
    synthetic_kv: bool = False
    passes: dict = field(default_factory=dict)  # which generation gave which numbers (timed, breakdown, check)
    roofline: dict = field(default_factory=dict)  # the step's lower bound on this hardware (harness/roofline.py), if computed
    serving: dict = field(default_factory=dict)  # a trace replay: the trace, KV, policy, the tables beside the record
    created_at: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        if d.get("schema_version") not in READABLE_VERSIONS:
            raise ValueError(f"schema_version {d.get('schema_version')!r} is not one of {READABLE_VERSIONS}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        rec = cls(**d)
        if rec.status not in STATUSES:
            raise ValueError(f"status {rec.status!r} is not one of {STATUSES}")
        return rec


# what the record says: where it is written and the sweep's own switches do not change it
NOT_MEASURED = ("results_dir", "resume", "plan", "fail_on_error")
# how it was measured: a projection (launcher=model) is not a measurement, one node is not four
LAUNCHER_HOW = ("kind", "dist_backend", "nodes", "tasks_per_node")


def run_id(resolved_config: dict) -> str:
    """Stable id of what a run measures and how: the config without where it is written and without the
    launcher's bookkeeping (time limits, partition, queue), but with the launcher's kind and layout, so that
    resume accepts only a record produced the same way."""
    keyed = {k: v for k, v in resolved_config.items() if k not in NOT_MEASURED and k != "launcher"}
    launcher = resolved_config.get("launcher") or {}
    keyed["launcher"] = {k: launcher[k] for k in LAUNCHER_HOW if k in launcher}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def write_atomically(text: str, directory: str | Path, name: str) -> Path:
    """Write a unique temporary file beside the target, then rename it over the target: a reader never sees half a
    file, and concurrent writers leave one whole file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    target = directory / name
    os.replace(tmp, target)
    return target


def write_record(record: RunRecord, directory: str | Path, name: str = "result.json") -> Path:
    """Atomic (write_atomically)."""
    return write_atomically(record.to_json(), directory, name)


def read_record(path: str | Path) -> RunRecord:
    return RunRecord.from_dict(json.loads(Path(path).read_text()))


def git_commit() -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def where_this_rank_runs() -> dict:
    """This process's host and, in a Slurm task, the job's node index it runs on (SLURM_NODEID)."""
    node = os.environ.get("SLURM_NODEID", "")
    return {"host": socket.gethostname(), "slurm_node_id": int(node) if node.isdigit() else None}


def placement_of(reports: list[dict]) -> dict:
    """Where a run's ranks ran, from their reports: the distinct hosts in rank order of first appearance, and each
    rank's host and Slurm node id by rank."""
    by_rank = sorted(reports, key=lambda r: r["rank"])
    return {"hosts": list(dict.fromkeys(r["host"] for r in by_rank if r.get("host"))),
            "rank_hosts": [r.get("host") for r in by_rank],
            "rank_slurm_node_ids": [r.get("slurm_node_id") for r in by_rank]}


def device_environment(device) -> dict:
    """What a measurement on `device` ran with: python and torch everywhere; on a GPU also its name, the driver, CUDA,
    cuDNN and NCCL versions, SMs and memory; Triton's version wherever it imports. A version that cannot be read
    is None. Used by the records' `env` (environment) and by every benchmark's output."""
    import torch

    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
                            "triton": _triton_version()}
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(device_name=torch.cuda.get_device_name(index), driver=_driver_version(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), nccl=_nccl_version(), sm_count=props.multi_processor_count,
                    memory_gb=props.total_memory / 1e9)
    else:  # a CPU names its processor; a GPU asked for where CUDA is not available names nothing
        info["device_name"] = None if device.type == "cuda" else platform.processor() or platform.machine()
    return info


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _nccl_version() -> Optional[str]:
    import torch

    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # a build without NCCL
        return None


def _driver_version() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # NVML is optional
        return None


def environment(world_size: int, device: str, dist_backend: Optional[str] = None, placement: Optional[dict] = None,
                slurm_job_id: Optional[str] = None) -> dict:
    """The record's `env`: versions and device (device_environment; `device` stays the config's "cuda" or "cpu"),
    and where the run ran (`placement`: placement_of(reports), else this host; `slurm_job_id`: for a record written
    outside the job, by its submitter)."""
    import torch

    versions = device_environment(device)
    if not (device == "cuda" and torch.cuda.is_available()):  # a CPU record names its CPU under `cpu` alone
        versions.pop("device_name")
    return {
        **(placement or {"hosts": [socket.gethostname()]}),
        "world_size": world_size,
        **versions,
        "device": device,
        "dist_backend": dist_backend,
        "slurm_job_id": slurm_job_id or os.environ.get("SLURM_JOB_ID"),
        "git_commit": git_commit(),
        "cpu": platform.processor() or platform.machine(),
    }


# ---- configs of earlier versions, as committed records hold them ------------------------------------------------
# Keys that configs of earlier versions hold and this one dropped: (path, what it was).
RETIRED_KEYS = [(("strategy", "pool", "capture_tp_base"), "FA Pool capture with a TP base, a diagnostic switch; "
                 "captured steps are the default for every base")]
# Keys added with a default other than how earlier versions ran: (path, the value a config without the key ran
# with). A record from before the key is read as it ran, not with today's default.
EARLIER_BEHAVIOUR = [(("strategy", "pool", "prefill_micro_batches"), 1)]  # records from before the field ran one group
# Earlier versions had one strategy schema, the union of every kind's fields; a kind's schema now holds its own.
# These fields of that union are dropped from a strategy whose kind's schema does not have them.
UNION_STRATEGY_FIELDS = ("kv_shards", "pool", "schedule", "kv_block")


def current_config(cfg_dict: dict) -> dict:
    """A run's config dict as this version's schema reads it: retired keys dropped, keys added since filled with
    how it ran, and the strategy's fields of other kinds (the earlier union schema) dropped. A copy."""
    import copy
    from dataclasses import fields

    from harness.strategies import spec_of

    cfg_dict = copy.deepcopy(dict(cfg_dict))  # the caller's config is left as it was

    def parent(path):
        node = cfg_dict
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else None

    for path, _ in RETIRED_KEYS:
        if (node := parent(path)) is not None:
            node.pop(path[-1], None)
    strategy = cfg_dict.get("strategy")
    if isinstance(strategy, dict):
        own = {f.name for f in fields(spec_of(strategy).config)}
        for key in UNION_STRATEGY_FIELDS:
            if key not in own:
                strategy.pop(key, None)
    for path, value in EARLIER_BEHAVIOUR:
        if (node := parent(path)) is not None:
            node.setdefault(path[-1], value)
    return cfg_dict
