"""The reference: the plain model on one device (the static engine at tp = pp = 1). Every strategy is checked
against it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness.fields import need
from harness.memory import DTYPE_BYTES, RoleMemory, activations
from harness.strategies.spec import register
from harness.strategies.static import StaticConfig, StaticSpec


@dataclass
class ReferenceConfig(StaticConfig):
    name: str = "reference"
    kind: str = "reference"

    KIND: ClassVar[str] = "reference"


class ReferenceSpec(StaticSpec):
    kind = "reference"
    config = ReferenceConfig
    family = "reference"
    step_role = "reference"

    def check(self, cfg) -> None:
        s = cfg.strategy
        need(s.tp == 1 and s.pp == 1, f"strategy.kind=reference runs on one device; got tp={s.tp}, pp={s.pp}")

    def memory_by_role(self, cfg) -> list[RoleMemory]:
        m = cfg.model
        b = DTYPE_BYTES[cfg.hardware.dtype]
        return [RoleMemory("reference", 1, m.param_count() * b, self.kv_bytes(cfg) * m.n_layers,
                           activations(m, cfg.workload.batch_size, 1, b))]


register(ReferenceSpec())
