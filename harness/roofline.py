"""The roofline of a measured decode step: the least time this hardware allows for what each rank must do.

Per rank and decode step:
    bytes it must read   weights it holds (the embedding table aside: a step reads only its batch's rows) +
                         the KV of the tokens it holds (mean context over the measured steps)
    time                 bytes / the read bandwidth measured on this machine, in the same job
                         + the collectives and messages the rank made per step (counted by the engine), each at
                           the time NCCL takes for its size inside a CUDA graph, measured in the same job
The step's roofline is the slowest rank's time: it assumes nothing overlaps within a rank (compute waits for
its all-reduces) and everything overlaps across ranks (a pipeline's stages, the pool and the base), so it is
a lower bound for every strategy. TPOT over it says how close a strategy runs to what its hardware allows.

Calibration (`comm`): {"all_reduce" | "all_gather" | "p2p": {group size: [[bytes, seconds per op], ...]}},
bytes per rank, sorted; harness/bench_multi.py measures it.
"""
from __future__ import annotations

import torch

from harness.costs import op_time
from harness.strategies import spec_of

# CommStats keys (model/parallel/) -> the calibrated operation they are
# counted traffic -> calibrated operation; everything else is a point-to-point message
OP_OF = {"tp_allreduce": "all_reduce", "tp_allgather": "all_gather", "dcp_allgather": "all_gather",
         "dcp_alltoall": "all_to_all"}


def kv_tokens_read(cfg, rank: dict) -> float:
    """Tokens of KV (all heads of one layer = 1) that this rank reads per step, summed over the layers it holds."""
    return spec_of(cfg.strategy).kv_tokens_read(cfg, rank)


def weight_bytes_read(cfg, rank: dict) -> float:
    m, s = cfg.model, cfg.strategy
    elem = torch.finfo(getattr(torch, cfg.hardware.dtype)).bits // 8
    holds_embedding = rank["role"] in ("reference", "stage0", "base")
    return rank["weight_bytes"] - (m.vocab_size * m.hidden * elem // s.tp if holds_embedding else 0)


def comm_seconds(cfg, rank: dict, comm: dict, steps: int) -> float:
    """This rank's collectives and messages per decode step at their calibrated in-graph time (the counts less
    the prefill's, which a record with a real prefill holds apart)."""
    s = cfg.strategy
    total = 0.0
    prefill_ops, prefill_bytes = rank.get("comm_ops_prefill") or {}, rank.get("comm_bytes_prefill") or {}
    for key, ops in (rank.get("comm_ops") or {}).items():
        ops -= prefill_ops.get(key, 0)
        if not ops:
            continue
        op = OP_OF.get(key, "p2p")
        group = 2 if op == "p2p" else s.kv_shards if key.startswith("dcp_") else s.tp
        size = (rank["comm_bytes"][key] - prefill_bytes.get(key, 0)) / ops
        if op in ("all_gather", "all_to_all"):
            size /= max(group - 1, 1)  # CommStats counts the bytes exchanged with the group - 1 others: per peer
        total += ops / steps * op_time(comm, op, group, size)
    return total


def roofline(cfg, record: dict, read_bytes_per_s: float, comm: dict) -> dict:
    """The record's roofline (see the module docstring) and its TPOT's ratio to it. cfg: the record's BenchConfig."""
    if not record.get("synthetic_kv", True) and any("comm_ops_prefill" not in r and any((r.get("comm_ops") or {}).values())
                                                    for r in record["ranks"]):
        # its counts mix the prefill's collectives in (records from before they were held apart): no decode roofline
        return {"step_ms": None, "ratio": None, "definition": "none: the record's message counts include its prefill"}
    m = cfg.model
    elem = torch.finfo(getattr(torch, cfg.hardware.dtype)).bits // 8
    token_bytes = 2 * m.hidden * elem  # K and V of one token in one layer, all heads
    steps = cfg.workload.output_tokens - 1
    per_rank = []
    for r in sorted(record["ranks"], key=lambda r: r["rank"]):
        w, kv = weight_bytes_read(cfg, r), kv_tokens_read(cfg, r) * token_bytes
        c = comm_seconds(cfg, r, comm, steps)
        per_rank.append({"rank": r["rank"], "role": r["role"], "weight_bytes": w, "kv_bytes": kv,
                         "memory_s": (w + kv) / read_bytes_per_s, "comm_s": c, "step_s": (w + kv) / read_bytes_per_s + c})
    bound = max(per_rank, key=lambda x: x["step_s"])
    tpot_s = record["metrics"]["mean_tpot_ms"] / 1e3
    return {"step_ms": bound["step_s"] * 1e3, "bound_rank": bound["rank"], "ratio": tpot_s / bound["step_s"],
            "read_bytes_per_s": read_bytes_per_s, "per_rank": per_rank,
            "definition": "max over ranks of (weights + KV read per step) / measured read bandwidth + the rank's "
                          "collectives and messages per step at their measured in-graph NCCL time"}
