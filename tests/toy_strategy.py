"""A strategy kind registered from outside the harness, as a user would add one (tests/test_strategy_plugin.py):
"replica", the whole model on one device (the static engine at tp = pp = 1), priced as one GPU's step times a
factor. Nothing in harness/ names it."""
from dataclasses import dataclass
from typing import ClassVar

from hydra.core.config_store import ConfigStore

from harness.costs import gpu_step_s
from harness.fields import above
from harness.memory import DTYPE_BYTES, RoleMemory, activations, context_lengths
from harness.strategies import StrategyConfig, StrategySpec, register


@dataclass
class ReplicaConfig(StrategyConfig):
    name: str = "replica"
    kind: str = "toy_replica"
    schedule: str = "continuous"  # what the static engine reads (one stage: no pipeline)
    kv_block: int = 16
    step_scale: float = 1.0  # the priced step is one GPU's step times this

    KIND: ClassVar[str] = "toy_replica"

    def __post_init__(self):
        above("strategy", self, 0, "step_scale", "kv_block")
        super().__post_init__()

    def kv_unit(self):
        return "strategy.kv_block", self.kv_block


class ReplicaSpec(StrategySpec):
    kind, config, family = "toy_replica", ReplicaConfig, "baseline"

    def build_engine(self, cfg, rank, world, device, dtype, timer):
        from model.parallel.static import StaticEngine

        return StaticEngine(cfg.model, cfg.strategy, rank, world, device, dtype, cfg.attention_backend, timer)

    def memory_by_role(self, cfg):
        m, b = cfg.model, DTYPE_BYTES[cfg.hardware.dtype]
        kv = cfg.workload.batch_size * max(context_lengths(cfg)) * 2 * m.hidden * b * m.n_layers
        return [RoleMemory("replica", 1, m.param_count() * b, kv, activations(m, cfg.workload.batch_size, 1, b))]

    def decode_step(self, cfg, cal, links, bw, flops, b, ctx, gpn, eager, graphed):
        step = cfg.strategy.step_scale * gpu_step_s(cal, cfg.model, len(ctx), ctx, 1, bw, flops, b, eager)
        return step, {"replica": {"other": step}}, None

    def prefill_s(self, cfg, cal, bw, flops, links, gpn):
        tokens = sum(context_lengths(cfg)) - cfg.workload.output_tokens * cfg.workload.batch_size
        return 2 * cfg.model.param_count() * tokens / (flops * cal.prefill_flops_fraction)


register(ReplicaSpec())

# its preset, as a file under conf/strategy/ would be: `strategy=replica`
ConfigStore.instance().store(group="strategy", name="replica",
                             node={"defaults": ["toy_replica_schema", "_self_"], "name": "replica"})
