"""What a strategy kind is to the harness: its config schema and one spec object that owns everything the harness
asks of the kind (checks, engine, memory per role, KV read per rank, step and prefill cost, report family).

A kind registers once (`register`); callers look its spec up by the config's kind (`spec_of`) and never branch
on the kind themselves. A kind can live outside this package: register it from any module, and the launchers
import that module in every rank process (`plugin_modules`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from harness.fields import ConfigError, at_least, need

if TYPE_CHECKING:
    from harness.config import BenchConfig
    from harness.memory import RoleMemory

FAMILIES = ("reference", "baseline", "offload")  # how reports group kinds: one device, static layouts, attention offloaded


@dataclass
class StrategyConfig:
    """The fields every kind has. A kind's config subclasses this; OmegaConf then refuses another kind's fields."""

    name: str = "reference"
    kind: str = "reference"  # which spec (harness/strategies/); a preset's schema fixes it
    tp: int = 1  # tensor-parallel ranks (the base group's size for fa_pool)
    pp: int = 1  # pipeline stages
    micro_batches: int = 1  # decode micro-batches (pipeline stages or pool/base overlap)
    world_size: int = 1  # declared ranks; the kind's spec says how many its layout takes
    cuda_graphs: bool = True  # on CUDA: steady-state steps replayed from CUDA graphs
    prefill_chunk: int = 0  # prompt tokens per prefill pass (0: whole prompts), whole KV blocks; bounds the
    #                         attention mask at batch x chunk x prompt length instead of batch x prompt length^2

    KIND: ClassVar[str] = ""  # the kind this schema belongs to (set by each kind's subclass)

    def __post_init__(self):
        if not self.KIND:  # the schema of "some kind" (BenchConfig's default before a preset's schema merges in)
            return
        need(self.kind == self.KIND,
             f"strategy.kind={self.kind!r} but this strategy's schema is kind {self.KIND!r} (a preset fixes its kind); "
             f"pick a preset of kind {self.kind!r} instead (strategy=<preset>, see conf/strategy/), then override its fields")
        at_least("strategy", self, 1, "tp", "pp", "micro_batches", "world_size")
        at_least("strategy", self, 0, "prefill_chunk")
        unit_name, unit = self.kv_unit()
        need(self.prefill_chunk % unit == 0,
             f"strategy.prefill_chunk={self.prefill_chunk} must be a multiple of {unit_name}={unit} "
             f"(a chunk fills whole KV blocks)")

    def kv_unit(self) -> tuple[str, int]:
        """(field, tokens) of the KV block a prefill chunk must fill whole."""
        return "strategy.prefill_chunk", 1


class StrategySpec:
    """A strategy kind. Subclass, set the class attributes, implement what the kind supports, `register()` an
    instance. Methods take the run's typed BenchConfig (`cfg`); `cfg.strategy` is an instance of `config`."""

    kind: ClassVar[str]
    config: ClassVar[type[StrategyConfig]]
    family: ClassVar[str]  # one of FAMILIES
    serves: ClassVar[bool] = False  # its engines serve a changing batch (workload.kind=trace)

    # ---- layout and checks ------------------------------------------------------------------------------
    def world_size(self, s: StrategyConfig) -> int:
        """The ranks the layout takes (strategy.world_size must say the same)."""
        return s.tp * s.pp

    def pool_ranks(self, s: StrategyConfig) -> int:
        """Ranks that hold KV but no weights (attention offloaded to them)."""
        return 0

    def reduction_group(self, s: StrategyConfig) -> tuple[str, int] | None:
        """(field, ranks) of a group that reduces within a node and so must tile the real nodes; None: none."""
        return None

    def check(self, cfg: BenchConfig) -> None:
        """Refuse combinations with other groups that this kind cannot run (ConfigError)."""

    # ---- running ------------------------------------------------------------------------------------------
    def build_engine(self, cfg: BenchConfig, rank: int, world: int, device, dtype, timer):
        """This rank's engine (model/parallel/ Engine API): static batches, and changing ones where `serves`."""
        raise NotImplementedError(f"strategy kind {self.kind!r} has no engine")

    # ---- memory and roofline ------------------------------------------------------------------------------
    def memory_by_role(self, cfg: BenchConfig) -> list[RoleMemory]:
        raise NotImplementedError(f"strategy kind {self.kind!r} does not say its memory per role")

    def kv_tokens_read(self, cfg: BenchConfig, rank: dict) -> float:
        """Tokens of KV (all heads of one layer = 1) this rank reads per decode step, over the layers it holds."""
        raise NotImplementedError(f"strategy kind {self.kind!r} does not say what KV a rank reads")

    def serving_block_bytes(self, cfg: BenchConfig) -> tuple[int, int, int]:
        """(tokens of a request per scheduler block, bytes of one block on a weight-holding rank, on a pool rank)."""
        raise NotImplementedError(f"strategy kind {self.kind!r} does not serve")

    def serving_placement(self, cfg: BenchConfig, block_tokens: int):
        """Where a request's KV goes beyond the weight-holding ranks (scheduler.PoolPlacement terms); None: there."""
        return None

    # ---- the performance model (harness/perfmodel.py prices with these; harness/costs.py has the primitives) --
    def decode_step(self, cfg: BenchConfig, cal, links, bw, flops, b, ctx, gpn, eager, graphed):
        """(step seconds, {role: {phase: seconds}}, pool busy fraction or None) of a decode step whose rows
        attend to `ctx` tokens."""
        raise NotImplementedError(f"strategy kind {self.kind!r} has no decode cost")

    def prefill_s(self, cfg: BenchConfig, cal, bw, flops, links, gpn: int) -> float:
        """Seconds of the workload's prefill, chunk by chunk as the engine runs it."""
        raise NotImplementedError(f"strategy kind {self.kind!r} has no prefill cost")

    def serving_config(self, s: StrategyConfig) -> StrategyConfig:
        """The strategy as its serving engine runs it (harness/perfmodel.serving_config)."""
        return s

    def serving_graphed(self, s: StrategyConfig) -> bool:
        """Whether a serving decode pass replays a captured graph."""
        return False

    # a serving decode pass's price depends only on (rows, total context, longest context): decode_totals_s gives
    # it, and a virtual replay prices a window of decode steps from those alone
    prices_decode_by_totals: ClassVar[bool] = False

    def decode_totals_s(self, pricer, rows: int, ctx_sum: int, ctx_max: int) -> float:
        raise NotImplementedError(f"strategy kind {self.kind!r} prices a decode pass by its rows")

    def serving_decode_s(self, pricer, decode_ctx, decode_pooled) -> float:
        """Seconds of a serving decode pass (pricer: harness/perfmodel.ServingPricer, for its rates and caches)."""
        raise NotImplementedError(f"strategy kind {self.kind!r} does not serve")

    def serving_prefill_host_s(self, cfg: BenchConfig, cal) -> float:
        """The host's time to launch one serving prefill pass (a pass takes at least this); 0: not host-bound."""
        return 0.0

    def serving_prefill_s(self, cfg: BenchConfig, cal, links, bw, flops, b, gpn, starts, lens, pooled,
                          one_mask: bool = False) -> float:
        """Seconds of one serving prefill pass: each row's chunk of lens[i] tokens after starts[i] cached ones.
        one_mask: the pass replays a bucket graph, which attends through one mask whatever its rows."""
        raise NotImplementedError(f"strategy kind {self.kind!r} does not serve")


SPECS: dict[str, StrategySpec] = {}


def register(spec: StrategySpec) -> StrategySpec:
    """Make `spec` the one of its kind; its config class must name the same kind."""
    need(spec.family in FAMILIES, f"strategy kind {spec.kind!r}: family {spec.family!r} is not one of {FAMILIES}")
    need(spec.config.KIND == spec.kind and {f.name for f in fields(spec.config)} >= {"name", "kind"},
         f"strategy kind {spec.kind!r}: its config class {spec.config.__name__} must subclass StrategyConfig with "
         f"KIND = {spec.kind!r}")
    SPECS[spec.kind] = spec
    return spec


def spec_of(kind_or_config) -> StrategySpec:
    """The spec of a kind name, a strategy config, or a strategy dict."""
    kind = kind_or_config if isinstance(kind_or_config, str) else \
        kind_or_config.get("kind") if isinstance(kind_or_config, dict) else kind_or_config.kind
    spec = SPECS.get(kind)
    if spec is None:
        raise ConfigError(f"strategy.kind={kind!r} is unknown; choose one of {', '.join(SPECS)} (or register a kind: "
                          f"harness/strategies/spec.py)")
    return spec


def family_of(kind: str) -> str:
    """A kind's report family; a kind not registered in this process reads as its own name."""
    spec = SPECS.get(kind)
    return spec.family if spec else kind


BUILTIN_PACKAGE = __name__.rsplit(".", 1)[0]


def plugin_modules() -> list[str]:
    """Modules outside this package that registered a kind: a rank process imports them before it builds."""
    return sorted({type(s).__module__ for s in SPECS.values() if not type(s).__module__.startswith(BUILTIN_PACKAGE)})


def load_plugins(modules) -> None:
    for name in modules or ():
        importlib.import_module(name)
