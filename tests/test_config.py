import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from harness.config import BenchConfig, validate
from harness.preflight import preflight
from tests.conftest import cfg_object, compose_cfg


def test_default_config_composes_and_validates():
    cfg = cfg_object()
    assert isinstance(cfg, BenchConfig)
    assert cfg.model.name == "tiny" and cfg.strategy.kind == "reference"
    validate(cfg)
    preflight(cfg)


def test_paper_model_preset():
    m = cfg_object(["model=paper"]).model
    assert (m.n_layers, m.hidden, m.n_heads, m.ffn_hidden, m.head_dim) == (4, 4096, 32, 16384, 128)


def _error_text(excinfo):
    e = excinfo.value
    return str(e) + str(getattr(e, "__cause__", "") or "")


def test_unknown_key_is_refused_with_its_name():
    with pytest.raises((ConfigCompositionException, ValidationError)) as ei:
        compose_cfg(["model.hiden=128"])
    assert "hiden" in _error_text(ei)


def test_wrong_type_is_refused_with_its_name():
    with pytest.raises((ConfigCompositionException, ValidationError)) as ei:
        compose_cfg(["model.n_heads=many"])
    assert "n_heads" in _error_text(ei)


def test_unknown_group_option_is_refused():
    with pytest.raises(ConfigCompositionException) as ei:
        compose_cfg(["strategy=tp3_pp7"])
    assert "tp3_pp7" in _error_text(ei)


def test_a_record_config_with_a_retired_key_still_loads():
    """Committed records of earlier versions keep keys this version dropped (harness/config.RETIRED_KEYS)."""
    from omegaconf import OmegaConf

    from harness.config import from_dict
    from harness.record import RETIRED_KEYS
    from tests.conftest import compose_cfg

    cfg_dict = OmegaConf.to_container(compose_cfg(["strategy=fa_pool_b2_p2"]), resolve=True)
    cfg_dict["strategy"]["pool"]["capture_tp_base"] = True
    assert ("strategy", "pool", "capture_tp_base") in [path for path, _ in RETIRED_KEYS]
    assert from_dict(cfg_dict).strategy.pool.size == 2
    assert cfg_dict["strategy"]["pool"]["capture_tp_base"] is True  # the caller's dict is left as it was


def test_a_record_config_from_before_a_key_reads_as_it_ran():
    """A committed FA Pool record from before strategy.pool.prefill_micro_batches prefilled in one group; today's
    default is 2, and a record that names the field keeps its value (harness/config.EARLIER_BEHAVIOUR)."""
    from omegaconf import OmegaConf

    from harness.config import from_dict
    from tests.conftest import compose_cfg

    cfg_dict = OmegaConf.to_container(compose_cfg(["strategy=fa_pool_b2_p2"]), resolve=True)
    assert from_dict(cfg_dict).strategy.pool.prefill_micro_batches == 2
    del cfg_dict["strategy"]["pool"]["prefill_micro_batches"]
    assert from_dict(cfg_dict).strategy.pool.prefill_micro_batches == 1
    assert "prefill_micro_batches" not in cfg_dict["strategy"]["pool"]  # the caller's dict is left as it was


def test_slurm_layout_derives_tasks_per_node_from_nodes_alone():
    from harness.config import LauncherConfig
    from harness.preflight import slurm_layout

    assert slurm_layout(LauncherConfig(kind="slurm", nodes=2, gpus_per_node=8), 16) == (2, 8)
    assert slurm_layout(LauncherConfig(kind="slurm", nodes=2, gpus_per_node=8), 4) == (2, 2)
    assert slurm_layout(LauncherConfig(kind="slurm", gpus_per_node=8), 40) == (5, 8)


def test_threads_per_rank_follow_the_task_not_the_job(monkeypatch):
    import os

    from harness.runner import threads_per_rank

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert threads_per_rank(16) == 6
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    assert threads_per_rank(16) == max(1, (os.cpu_count() or 1) // 8)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    assert threads_per_rank(2) == max(1, (os.cpu_count() or 1) // 2)


def test_placement_check_refuses_ranks_not_in_node_blocks():
    import pytest

    from harness.runner import check_placement
    from tests.conftest import cfg_object

    cfg = cfg_object(["launcher=slurm_local", "strategy=tp2_pp2"])
    cfg.launcher.tasks_per_node = 2
    def places(hosts, nodes=(None,) * 4):
        return [{"host": h, "slurm_node_id": n} for h, n in zip(hosts, nodes)]

    check_placement(cfg, places("aabb"))
    check_placement(cfg, places("aabb", (0, 0, 1, 1)))
    with pytest.raises(RuntimeError, match=r"ranks \[1, 3\] are not where the topology assumes them, in blocks of 2"):
        check_placement(cfg, places("abab"))  # cyclic
    with pytest.raises(RuntimeError, match=r"ranks \[1, 2\]"):  # hosts alike (one machine), node ids cyclic
        check_placement(cfg, places("aaaa", (0, 1, 0, 1)))
    with pytest.raises(RuntimeError, match="of different nodes"):  # two blocks on one host
        check_placement(cfg, places("aaaa"))


def test_paper_serving_h200_preset_composes_and_validates_at_every_point():
    from pathlib import Path

    import yaml

    preset = Path(__file__).resolve().parent.parent / "conf" / "experiment" / "paper_serving_h200.yaml"
    params = yaml.safe_load(preset.read_text())["hydra"]["sweeper"]["params"]
    for strategy in params["strategy"].split(","):
        cfg = cfg_object(["experiment=paper_serving_h200", f"strategy={strategy}"])
        validate(cfg)
        preflight(cfg)
        assert cfg.hardware.name == "h200" and cfg.launcher.kind == "model" and cfg.workload.kind == "trace"
    gpus = {s: cfg_object(["experiment=paper_serving_h200", f"strategy={s}"]).strategy.world_size
            for s in ("tp8_pp2", "dcp_t8_k8_pp2", "fa_pool_iso16", "tp8_pp4", "tp16_pp2")}
    assert gpus == {"tp8_pp2": 16, "dcp_t8_k8_pp2": 16, "fa_pool_iso16": 16, "tp8_pp4": 32, "tp16_pp2": 32}
