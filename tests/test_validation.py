"""Bad input is refused before launch, each refusal naming the field, the value and the fix."""
import pytest
import torch
from hydra.errors import ConfigCompositionException

from harness.config import ConfigError, validate as validate_fields
from harness.preflight import preflight
from tests.conftest import cfg_object, compose_cfg


def validate(cfg):
    """What the app checks before it launches: the config's fields, then the preflight (memory, Slurm, machine)."""
    validate_fields(cfg)
    preflight(cfg)

# (id, overrides, words the message must contain). docs/bad_input_and_faults.md's table of refused cases mirrors this list.
REFUSED = [
    ("heads_not_divisible_by_tp", ["strategy=tp2_pp1", "strategy.tp=3", "strategy.world_size=3"],
     ["model.n_heads=4", "strategy.tp=3"]),
    ("layers_not_divisible_by_pp", ["strategy=tp1_pp2", "strategy.pp=3", "strategy.world_size=3"],
     ["model.n_layers=2", "strategy.pp=3"]),
    ("hidden_not_divisible_by_heads", ["model.hidden=66"], ["model.hidden=66", "model.n_heads=4"]),
    ("ffn_not_divisible_by_tp", ["strategy=tp4_pp1", "model.ffn_hidden=250"], ["model.ffn_hidden=250", "strategy.tp=4"]),
    ("vocab_not_divisible_by_tp", ["strategy=tp4_pp1", "model.vocab_size=510"], ["model.vocab_size=510"]),
    ("pool_above_max", ["strategy=fa_pool_b2_p4", "strategy.pool.max_size=2"],
     ["strategy.pool.size=4", "strategy.pool.max_size=2"]),
    ("pool_negative", ["strategy=fa_pool_b2_p2", "strategy.pool.size=-1", "strategy.world_size=1"],
     ["strategy.pool.size=-1", ">= 0"]),
    ("threshold_not_positive", ["strategy=fa_pool_b2_p2", "strategy.pool.threshold=0"], ["strategy.pool.threshold=0"]),
    ("block_size_not_positive", ["strategy=fa_pool_b2_p2", "strategy.pool.block_size=-8"], ["strategy.pool.block_size=-8"]),
    ("unknown_pool_policy", ["strategy=fa_pool_b2_p2", "strategy.pool.policy=random"], ["strategy.pool.policy='random'"]),
    ("fa_pool_with_pipeline", ["strategy=fa_pool_b2_p2", "strategy.pp=2", "strategy.world_size=6"], ["strategy.pp=2"]),
    ("one_output_token", ["workload.output_tokens=1"], ["workload.output_tokens=1", "at least 2"]),
    ("batch_size_zero", ["workload.batch_size=0", "strategy.micro_batches=1"], ["workload.batch_size=0"]),
    ("more_micro_batches_than_sequences", ["strategy=tp2_pp2", "workload.batch_size=1"],
     ["strategy.micro_batches=2", "workload.batch_size=1"]),
    ("world_size_mismatch", ["strategy=tp2_pp2", "strategy.world_size=5"], ["strategy.world_size=5", "= 4"]),
    ("reference_with_tp", ["strategy.tp=2", "strategy.world_size=2"], ["reference", "tp=2"]),
    ("bucket_min_above_max", ["workload.buckets=[[64,32]]"], ["[64, 32]", "min <= max"]),
    ("bucket_not_a_pair", ["workload.buckets=[[64]]"], ["[64]", "[min, max]"]),
    ("prompt_length_zero", ["workload.prompt_lens=[0,4]"], ["workload.prompt_lens=[0, 4]"]),
    ("flash_attn_on_cpu", ["attention_backend=flash_attn"], ["attention_backend", "flash"]),
    ("cuda_without_gpu", ["hardware=a100_80gb", "model=tiny"], ["hardware.device=cuda", "hardware=cpu"]),
    ("nccl_without_gpu", ["launcher.dist_backend=nccl"], ["nccl", "gloo"]),
    ("unknown_dtype", ["hardware.dtype=float8"], ["hardware.dtype='float8'"]),
    ("slurm_without_partition", ["launcher=slurm_a100", "launcher.partition=null", "strategy=tp2_pp2"],
     ["partition", "launcher.partition="]),
    ("world_not_nodes_times_tasks", ["launcher=slurm_a100", "strategy=tp2_pp2", "launcher.nodes=3", "launcher.tasks_per_node=1"],
     ["strategy.world_size=4", "nodes 3 x tasks_per_node 1"]),
    ("tasks_per_node_above_gpus", ["launcher=slurm_a100", "hardware=a100_80gb", "strategy=tp8_pp2", "model=paper",
                                   "launcher.nodes=1", "launcher.tasks_per_node=16"],
     ["launcher.tasks_per_node=16", "launcher.gpus_per_node=8"]),
    ("does_not_fit_in_memory", ["launcher=slurm_a100", "hardware=a100_80gb", "model=paper", "strategy=tp8_pp2",
                                "workload=len32768"],
     ["does not fit", "a100_80gb", "GB per GPU", "KV"]),
    ("fault_rank_outside_world", ["fault.kind=raise", "fault.rank=3"], ["fault.rank=3", "0..0"]),
    ("unknown_fault", ["fault.kind=meteor"], ["fault.kind='meteor'"]),
    ("timeout_not_positive", ["launcher.timeout_s=0"], ["launcher.timeout_s=0"]),
    ("no_layers", ["strategy=fa_pool_b2_p2", "workload=tiny_short", "model.n_layers=0"], ["model.n_layers=0", ">= 1"]),
    ("init_std_nan", ["model.init_std=nan"], ["model.init_std=nan", "> 0"]),
    ("kv_fraction_above_one", ["strategy=fa_pool_b2_p2", "strategy.pool.kv_memory_fraction=1.5"],
     ["strategy.pool.kv_memory_fraction=1.5", "(0, 1]"]),
    ("wavefront_without_overlap",
     ["strategy=fa_pool_b2_p2", "strategy.pool.async_overlap=false", "strategy.pool.wavefront=true"],
     ["strategy.pool.wavefront=true", "async_overlap=true"]),
    ("prefill_chunk_not_whole_blocks", ["strategy.prefill_chunk=100"], ["strategy.prefill_chunk=100", "strategy.kv_block=256"]),
    ("flash_attn_with_real_prefill", ["launcher=model", "hardware=a100_80gb", "attention_backend=flash_attn"],
     ["attention_backend=flash_attn", "bottom", "workload.synthetic_kv=true"]),
    ("math_attention_for_a_long_gpu_prefill", ["hardware=cuda", "model=paper", "workload.prompt_lens=[8192]",
                                               "workload.batch_size=16", "strategy.prefill_chunk=2048"],
     ["attention_backend=math", "32 GiB", "attention_backend=sdpa"]),
    ("trace_without_profile", ["profile_trace=true"], ["profile_trace=true", "profile=true", "profile_prefill=true"]),
    ("profile_prefill_with_synthetic_kv", ["profile_prefill=true", "workload.synthetic_kv=true"],
     ["profile_prefill=true", "workload.synthetic_kv=false"]),
    ("check_reference_with_synthetic_kv", ["check_reference=true", "workload.synthetic_kv=true"],
     ["check_reference=true", "workload.synthetic_kv=true"]),
    ("pool_nodes_unlike_job_nodes", ["launcher=slurm_a100", "hardware=a100_80gb", "model=paper", "strategy=fa_pool",
                                     "workload=len16384", "workload.batch_size=64", "strategy.pool.gpus_per_node=16"],
     ["strategy.pool.gpus_per_node=16", "8 tasks per node"]),
    ("launcher_gpus_unlike_hardware", ["launcher=slurm_a100", "hardware=a100_80gb", "model=paper", "strategy=tp8_pp2",
                                       "workload=len2048", "workload.batch_size=64", "launcher.gpus_per_node=4"],
     ["launcher.gpus_per_node=4", "hardware.gpus_per_node=8"]),
    ("projected_pool_nodes_unlike_hardware", ["launcher=model", "hardware=a100_80gb", "model=paper", "strategy=fa_pool",
                                              "workload=len16384", "workload.batch_size=64", "strategy.pool.gpus_per_node=3"],
     ["strategy.pool.gpus_per_node=3", "hardware.gpus_per_node=8"]),
]


@pytest.mark.parametrize("overrides,words", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_with_field_value_and_fix(overrides, words):
    with pytest.raises(ConfigError) as ei:
        validate(cfg_object(overrides))  # a group's own range check fires in cfg_object, the rest in validate
    for w in words:
        assert w in str(ei.value), f"{w!r} not in {ei.value}"


def test_there_are_at_least_20_distinct_refusals():
    assert len({c[0] for c in REFUSED}) >= 20


@pytest.mark.parametrize("group,name", [("strategy", "tp3_pp7"), ("workload", "len99"), ("hardware", "tpu_v5"),
                                        ("launcher", "pbs")])
def test_unknown_group_option_names_the_option(group, name):
    with pytest.raises(ConfigCompositionException) as ei:
        compose_cfg([f"{group}={name}"])
    assert name in str(ei.value) and group in str(ei.value)


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    # a CPU machine cannot show this for real: pretend a GPU is there that lacks bf16 (e.g. a V100)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = cfg_object(["hardware=a100_80gb"])
    with pytest.raises(ConfigError, match="hardware.dtype=bfloat16 is not supported"):
        validate(cfg)


def test_paper_configs_that_fit_are_accepted_at_paper_scale():
    # the FA Pool spreads the long KV over 32 pool GPUs; 64 sequences of 16K fit on the A100s
    cfg = cfg_object(["launcher=slurm_a100", "hardware=a100_80gb", "model=paper", "strategy=fa_pool",
                      "workload=len16384", "workload.batch_size=64"])
    validate(cfg)


SCHEMAS = ["harness.strategies.fa_pool:PoolConfig", "harness.strategies.fa_pool:FAPoolConfig",
           "harness.strategies.static:StaticConfig", "harness.strategies.reference:ReferenceConfig",
           "harness.strategies.dcp:DCPConfig", "harness.config:WorkloadConfig",
           "harness.config:LauncherConfig", "harness.config:HardwareConfig", "harness.config:FaultConfig",
           "model.config:ModelConfig"]


def numeric_fields():
    import dataclasses
    import importlib

    for path in SCHEMAS:
        module, name = path.split(":")
        cls = getattr(importlib.import_module(module), name)
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", int, float):
                yield pytest.param(cls, f.name, f.type in ("float", float), id=f"{name}.{f.name}")


@pytest.mark.parametrize("cls,name,is_float", list(numeric_fields()))
def test_every_numeric_field_has_a_range_checked_by_its_own_group(cls, name, is_float):
    """A new numeric field that its group forgets to check fails here (no central list to forget it in)."""
    cls()  # the defaults are valid
    for bad in ([-1.0, float("nan")] if is_float else [-1]):
        with pytest.raises(ValueError, match=name):
            cls(**{name: bad})


def test_results_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    for where in ("afile", "afile/sub"):
        with pytest.raises(ConfigError) as ei:
            validate(cfg_object([f"results_dir={tmp_path / where}"]))
        assert f"results_dir={tmp_path / where}: {tmp_path / 'afile'} is a file" in str(ei.value)
        assert "leave results_dir unset" in str(ei.value)
    validate(cfg_object([f"results_dir={tmp_path / 'new' / 'dir'}"]))  # a directory yet to be made is fine
