"""Memory per GPU role: weights, KV cache as the engines allocate it, activations and a fixed workspace per rank,
by role (`reference`, `stage<i>`, `base`, `pool`). It decides feasibility before anything is launched
(`harness.config.validate` refuses what does not fit) and feeds the performance model's projected records.
"""
from __future__ import annotations

import math
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


def _activations(m: ModelConfig, rows: int, tp: int, b: int) -> int:
    # one micro-batch's hidden states, QKV, FFN inner and fp32 logits (the largest live set of a step)
    return rows * ((4 * m.hidden + m.ffn_hidden) // tp * b + m.vocab_size // tp * 4)


def memory_by_role(cfg: BenchConfig) -> list[RoleMemory]:
    m, s = cfg.model, cfg.strategy
    b = DTYPE_BYTES[cfg.hardware.dtype]
    ctx = context_lengths(cfg)
    kv_token = 2 * m.hidden * b  # one token, one layer, all heads
    embed = m.vocab_size * m.hidden * b  # the embedding; the head has the same size
    rows = math.ceil(cfg.workload.batch_size / max(s.micro_batches, 1))
    if s.kind in ("reference", "static", "dcp"):
        # the engine (model/parallel/static.py, StageKV) gives every sequence room for the longest context,
        # in whole blocks of kv_block tokens; a DCP shard (model/parallel/dcp.py) room for its share of the
        # blocks, k times the heads, and one spare block per sequence
        k = s.kv_shards
        row_tokens = math.ceil(math.ceil(max(ctx) / s.kv_block) / k) * k * s.kv_block
        kv = cfg.workload.batch_size * (row_tokens + (k * s.kv_block if s.kind == "dcp" else 0)) * kv_token
        if s.kind == "reference":
            return [RoleMemory("reference", 1, m.param_count() * b, kv * m.n_layers,
                               _activations(m, cfg.workload.batch_size, 1, b))]
        layers = m.n_layers // s.pp
        roles = []
        for stage in range(s.pp):
            w = layers * layer_params(m) * b // s.tp + (embed // s.tp if stage == 0 else 0) \
                + (embed // s.tp + m.hidden * b if stage == s.pp - 1 else 0)
            # DCP also holds the group's gathered q, k, v and the fp32 partials sent and received
            act = _activations(m, rows, s.tp, b) + (rows * k * m.hidden // s.tp * (3 * b + 2 * 4) if k > 1 else 0)
            roles.append(RoleMemory(f"stage{stage}", s.tp, w, kv * layers // s.tp, act))
        return roles
    p = s.pool
    # the base preallocates a cache row of ceil(min(longest context, threshold) / block) blocks for every
    # sequence that starts short (model/parallel/fa_pool_plan.py), plus one trash block
    starts_short = [n for n in prompt_lengths(cfg.workload) if n <= p.threshold or p.size == 0]
    row_tokens = math.ceil(min(max(ctx), p.threshold if p.size else max(ctx)) / p.block_size) * p.block_size
    base_kv = (len(starts_short) * row_tokens + p.block_size) * kv_token * m.n_layers // s.tp
    base = RoleMemory("base", s.tp, m.param_count() * b // s.tp, base_kv, _activations(m, rows, s.tp, b))
    roles = [base]
    if p.size:
        long = [n for n in ctx if n > p.threshold]
        blocks = sum(math.ceil(n / p.block_size) for n in long)
        per_rank_blocks = math.ceil(blocks / p.size)  # blocks are spread over the pool ranks
        kv = per_rank_blocks * p.block_size * kv_token * m.n_layers
        # the paged kernel reads blocks in place: live buffers are a micro-batch's q, new k/v and fp32 partials
        act = rows * m.hidden * (3 * b + 2 * 4)
        roles.append(RoleMemory("pool", p.size, 0, kv, act))
    return roles


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
