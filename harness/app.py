"""The `fapool-bench` command: a Hydra app. Validates the config, launches the run, leaves a record."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, file_in_the_way, load, register_configs, validate
from harness.preflight import preflight
from harness.launch import launch_local, record_failure
from harness.plan import Sweep, plan_line
from harness.record import read_record, run_id, write_record

log = logging.getLogger("fapool")
register_configs()
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def summary(rec) -> str:
    s = rec.config["strategy"]["name"]
    if rec.status != "ok":
        return f"{s}: {rec.status}: {(rec.error or '').strip().splitlines()[-1] if rec.error else ''}"
    m = rec.metrics
    if rec.serving:  # a trace replay
        c = rec.reference_check
        nan = float("nan")
        check = (f"  per-request check: passed={c['passed']} ({c['requests_checked']} requests, max rel err "
                 f"{c['max_rel_logit_error'] or 0.0:.1e} <= {c['rtol']:g})") if c else ""
        return (f"{s}: ok  {m['completed']}/{m['requests']} requests ({m['refused']} refused)  p50/p99 TTFT "
                f"{m['ttft_ms_p50'] or nan:.0f}/{m['ttft_ms_p99'] or nan:.0f} ms  p50/p99 TPOT {m['tpot_ms_p50'] or nan:.1f}/"
                f"{m['tpot_ms_p99'] or nan:.1f} ms  goodput {m['goodput']:.2f} req/s{check}")
    check = ""
    if rec.reference_check:
        c = rec.reference_check
        check = (f" ref_check: passed={c['passed']} (teacher-forced max_err={c['max_abs_logit_error']:.2e}, "
                 f"rel {c['max_rel_logit_error']:.1e} <= {c['rtol']:g}; free-running tokens_equal={c['tokens_equal']})")
    return (f"{s}: ok  mean TPOT {m['mean_tpot_ms']:.2f} ms  TPS {m['tps'] or float('nan'):.1f}  "
            f"GPUs/ranks {m['num_gpus']}{check}")


def run(cfg: DictConfig, out_dir: str):
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    try:
        cfg_obj = load(cfg)
        validate(cfg_obj)
        preflight(cfg_obj)
    except ConfigError as e:
        world, device = cfg_dict["strategy"]["world_size"], cfg_dict["hardware"]["device"]
        return read_record(record_failure(cfg_dict, "invalid", str(e), world, device, out_dir))
    world = cfg_obj.strategy.world_size
    if cfg_obj.plan:
        planned = Sweep.current().planned
        planned.append(plan_line(cfg_obj))
        print("PLAN", planned[-1])
        return None
    existing = Path(out_dir) / "result.json"
    if cfg_obj.resume and existing.exists():
        try:
            old = read_record(existing)
        except (OSError, ValueError, TypeError):
            old = None
        if old is not None and old.status == "ok" and old.run_id == run_id(cfg_dict):
            log.info("resume: %s already has an ok record of this config; skipped", out_dir)
            return old
    if cfg_obj.launcher.kind == "model" and cfg_obj.workload.kind == "trace":  # the replay in virtual time
        from harness.serving.virtual import project_serving

        project_serving(cfg_obj, cfg_dict, out_dir)
        return read_record(Path(out_dir) / "result.json")
    if cfg_obj.launcher.kind == "model":  # projected: nothing runs
        from harness.calibration import default_calibration
        from harness.perfmodel import project

        return read_record(write_record(project(cfg_obj, cfg_dict, default_calibration()), out_dir))
    if cfg_obj.launcher.kind == "slurm":
        from harness.slurm import launch_slurm

        return launch_slurm(cfg_obj, cfg_dict, out_dir, Sweep.current().pending)
    path = launch_local(cfg_dict, world, out_dir, cfg_obj.launcher.timeout_s, cfg_obj.hardware.device)
    return read_record(path)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig):
    out_dir = cfg.results_dir or HydraConfig.get().runtime.output_dir
    if cfg.results_dir and file_in_the_way(cfg.results_dir):  # validate() refuses it; the record goes to Hydra's directory
        out_dir = HydraConfig.get().runtime.output_dir
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    if multirun and cfg.launcher.kind == "slurm":  # submit every point now; the sweep waits at its end
        cfg.launcher.wait = False
    rec = run(cfg, out_dir)
    if rec is None:
        if not cfg.plan:
            print(f"{cfg.strategy.name} x {cfg.workload.name}: submitted -> {Path(out_dir) / 'result.json'}")
        return "planned" if cfg.plan else "submitted"
    print(summary(rec), f"-> {Path(out_dir) / 'result.json'}")
    if rec.status != "ok" and not multirun:
        sys.exit(1)
    return rec.status


if __name__ == "__main__":
    main()
