"""plan=true: what a run or a sweep would take (jobs, nodes, GPUs, GPU-hours); nothing is submitted."""
from __future__ import annotations



class Sweep:
    """What one run or sweep of this process has planned (plan=true) and submitted to Slurm without waiting.
    The multirun callback (harness/callbacks.py) opens one at the sweep's start and reads it at its end; the app
    adds to the open one. Outside a callback (a test calling the app directly) one opens on first use."""

    _open: "Sweep | None" = None

    def __init__(self):
        self.planned: list[dict] = []  # plan=true: what each point would take
        self.pending: list = []  # harness.slurm.Pending: submitted, not yet waited for

    @classmethod
    def start(cls) -> "Sweep":
        cls._open = cls()
        return cls._open

    @classmethod
    def current(cls) -> "Sweep":
        return cls._open or cls.start()

    @classmethod
    def close(cls) -> None:
        cls._open = None


def plan_line(cfg) -> dict:
    """Jobs, nodes, GPUs and an upper bound of GPU-hours (the time limit), plus the projected run time."""
    from harness.preflight import slurm_layout

    world = cfg.strategy.world_size
    if cfg.launcher.kind == "slurm":
        nodes, per_node = slurm_layout(cfg.launcher, world)
        limit_h = cfg.launcher.time_min / 60
    else:
        nodes, per_node, limit_h = 1, world, cfg.launcher.timeout_s / 3600
    gpus = world if cfg.hardware.device == "cuda" else 0
    line = {"strategy": cfg.strategy.name, "workload": cfg.workload.name, "launcher": cfg.launcher.name,
            "nodes": nodes, "tasks_per_node": per_node, "gpus": gpus, "gpu_hours_limit": gpus * limit_h}
    if cfg.hardware.hbm_gbps:  # a GPU preset: the performance model can say how long it should take
        from harness.calibration import default_calibration
        from harness.perfmodel import predict_step

        pred = predict_step(cfg, default_calibration())
        steps = cfg.workload.warmup_steps * 2 + cfg.workload.output_tokens
        prefills = 0 if cfg.workload.synthetic_kv else 2  # warm-up and measured generation
        line["projected_run_s"] = pred["prefill_s"] * prefills + pred["step_s"] * steps
    return line
