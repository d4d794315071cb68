"""Preflight: after the config validates (harness/config.py), what a run needs of the world: memory that fits
(each role's, as its strategy's spec computes it), a Slurm layout that tiles the nodes, and on this machine the
device, dtype, backend and attention kernel it asks for. Raises ConfigError, naming the field and the fix."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from harness.fields import ConfigError, need
from harness.memory import RoleMemory
from harness.strategies import spec_of

if TYPE_CHECKING:
    from harness.config import BenchConfig, LauncherConfig


def slurm_layout(launcher: LauncherConfig, world: int) -> tuple[int, int]:
    """(nodes, tasks per node) of a run of `world` ranks under this launcher."""
    if launcher.nodes and not launcher.tasks_per_node:  # nodes alone: the tasks spread evenly over them
        return launcher.nodes, math.ceil(world / launcher.nodes)
    per_node = launcher.tasks_per_node or min(world, launcher.gpus_per_node or world)
    nodes = launcher.nodes or math.ceil(world / per_node)
    return nodes, per_node


def check_topology(cfg: BenchConfig) -> None:
    """GPUs per node is stated by the hardware, the Slurm launcher and the FA Pool (which reduces partials
    within a node first). Where they describe real nodes they must agree: the launcher's GPUs are the
    hardware's, and the pool's reduction groups must tile the real nodes (divide their size), or a
    'within-node' reduction would cross nodes. The local launcher runs every rank on this one machine: there
    the pool's gpus_per_node only groups ranks (tests pretend 2 to exercise both reduction levels)."""
    s, L, hw = cfg.strategy, cfg.launcher, cfg.hardware
    group = spec_of(s).reduction_group(s)
    if L.kind == "slurm":
        _, per_node = slurm_layout(L, s.world_size)
        if hw.device == "cuda":
            need(L.gpus_per_node == hw.gpus_per_node,
                 f"launcher.gpus_per_node={L.gpus_per_node} but hardware.gpus_per_node={hw.gpus_per_node} "
                 f"({hw.name}): set them equal, to the GPUs a node of your partition has")
        if group is not None:
            name, size = group
            need(per_node % size == 0,
                 f"{name}={size} but the job runs {per_node} tasks per node: the within-node reduction's groups would "
                 f"cross nodes; set {name}={per_node} (or a divisor of it)")
    if L.kind == "model" and group is not None and hw.device == "cuda":
        name, size = group
        need(hw.gpus_per_node % size == 0,
             f"{name}={size} but hardware.gpus_per_node={hw.gpus_per_node} ({hw.name}): the within-node reduction's "
             f"groups would cross the hardware's nodes; set {name}={hw.gpus_per_node} (or a divisor of it)")


def memory_by_role(cfg: BenchConfig) -> list[RoleMemory]:
    """Every role's memory per GPU (weights, KV as the engine allocates it, activations, a workspace)."""
    return spec_of(cfg.strategy).memory_by_role(cfg)


def check_fits(cfg: BenchConfig) -> str | None:
    """None if every role fits in hardware.memory_gb; else a message with the numbers."""
    cap = cfg.hardware.memory_gb * 1e9
    if cap <= 0:
        return None
    for r in memory_by_role(cfg):
        if r.total_bytes > cap:
            return (f"{cfg.strategy.name} x {cfg.workload.name} does not fit on {cfg.hardware.name}: role {r.role} needs "
                    f"{r.total_bytes / 1e9:.1f} GB per GPU (weights {r.weight_bytes / 1e9:.1f} + KV {r.kv_bytes / 1e9:.1f} + "
                    f"activations {r.activation_bytes / 1e9:.1f} + workspace {r.workspace_bytes / 1e9:.1f}) > "
                    f"hardware.memory_gb={cfg.hardware.memory_gb:g}; lower workload.batch_size or the lengths, or add ranks")
    return None


def check_slurm(cfg: BenchConfig) -> None:
    """A Slurm run: a partition, and nodes x tasks per node that make the world, one task per GPU."""
    L, s = cfg.launcher, cfg.strategy
    need(bool(L.partition), f"launcher {L.name!r} has no partition; set launcher.partition=<your partition>")
    nodes, per_node = slurm_layout(L, s.world_size)
    need(nodes * per_node == s.world_size,
         f"strategy.world_size={s.world_size} != launcher nodes {nodes} x tasks_per_node {per_node}; "
         f"set launcher.nodes and launcher.tasks_per_node so that their product is {s.world_size}")
    if cfg.hardware.device == "cuda":
        need(per_node <= L.gpus_per_node,
             f"launcher.tasks_per_node={per_node} exceeds launcher.gpus_per_node={L.gpus_per_node}: one task per GPU; "
             f"use more nodes")


def check_this_machine(cfg: BenchConfig) -> None:
    """What running here needs of this machine (a Slurm run's nodes are checked there)."""
    import torch

    from model.attention import BackendUnavailable, check_backend

    if cfg.hardware.device == "cuda":
        need(torch.cuda.is_available(), "hardware.device=cuda but no CUDA device is visible; use hardware=cpu")
    if cfg.launcher.dist_backend == "nccl":
        need(cfg.hardware.device == "cuda" and torch.cuda.is_available(),
             "launcher.dist_backend=nccl needs CUDA GPUs; use gloo on CPU")
    if cfg.hardware.dtype == "bfloat16" and cfg.hardware.device == "cuda":
        need(torch.cuda.is_bf16_supported(), "hardware.dtype=bfloat16 is not supported by this GPU; use float32")
    try:
        check_backend(cfg.attention_backend, cfg.hardware.device)
    except BackendUnavailable as e:
        raise ConfigError(f"attention_backend: {e}") from None


def preflight(cfg: BenchConfig) -> None:
    """Everything above that applies to cfg's launcher and workload. Raises ConfigError."""
    check_topology(cfg)
    if cfg.launcher.kind == "slurm":
        check_slurm(cfg)
    if cfg.launcher.kind != "model" and cfg.workload.kind == "batch":  # a projection that cannot fit is recorded as projected oom
        too_big = check_fits(cfg)
        need(too_big is None, str(too_big))
    if cfg.launcher.kind == "local":
        check_this_machine(cfg)
