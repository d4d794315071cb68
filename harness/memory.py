"""Memory per GPU role: weights, KV cache as the engines allocate it, activations and a fixed workspace per rank,
by role (`reference`, `stage<i>`, `base`, `pool`). Each strategy kind's spec
(harness/strategies/) computes its roles from these; harness/preflight.py refuses what does not fit before anything
is launched, and the performance model's projected records carry it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.workload import prompt_lengths
from model.config import ModelConfig

if TYPE_CHECKING:
    from harness.config import BenchConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
WORKSPACE_BYTES = 1 << 30  # CUDA context, NCCL buffers, allocator slack: 1 GiB per rank (assumed)


@dataclass
class RoleMemory:
    role: str
    ranks: int
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    workspace_bytes: int = WORKSPACE_BYTES

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.workspace_bytes


def layer_params(m: ModelConfig) -> int:
    return 2 * m.hidden + 4 * m.hidden * m.hidden + 2 * m.hidden * m.ffn_hidden


def context_lengths(cfg: BenchConfig) -> list[int]:
    """Every sequence's context at the end of the run (prompt + generated tokens)."""
    return [n + cfg.workload.output_tokens for n in prompt_lengths(cfg.workload)]


def mean_context_lengths(cfg: BenchConfig) -> list[int]:
    """Every sequence's context in the middle of its decode steps (prompt + half the output): the mean a step sees."""
    return [n + cfg.workload.output_tokens // 2 for n in prompt_lengths(cfg.workload)]


def activations(m: ModelConfig, rows: int, tp: int, b: int) -> int:
    # one micro-batch's hidden states, QKV, FFN inner and fp32 logits (the largest live set of a step)
    return rows * ((4 * m.hidden + m.ffn_hidden) // tp * b + m.vocab_size // tp * 4)


def context_tokens(cfg: BenchConfig) -> tuple[list[int], float]:
    """(prompt lengths, mean number of new tokens in the cache over the measured decode steps)."""
    return prompt_lengths(cfg.workload), cfg.workload.output_tokens / 2
