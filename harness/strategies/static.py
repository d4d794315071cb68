"""Static tensor x pipeline parallelism (model/parallel/static.py): every rank holds its stage's weights and its
heads' KV of every sequence; a step is each micro-batch's pass through the stages, a captured CUDA graph per
stage pass where one stage."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from harness.costs import (attn_s, collective_s, eager_collectives, gemm_s, layer_gemms_s, masked_attn_s,
                           prefill_chunks, prefill_copy_s, rows_cached_kv_bytes, rows_prefill_attn_flops,
                           serving_gather_s, serving_prefill_gemms_s, serving_prefill_head_s, serving_prefill_rest_s)
from harness.fields import at_least, need
from harness.memory import DTYPE_BYTES, RoleMemory, activations, context_lengths, context_tokens, layer_params
from harness.strategies.spec import StrategyConfig, StrategySpec, register
from harness.workload import prompt_lengths

SCHEDULES = ("continuous", "gpipe")  # the pipeline schedules of model/parallel/static.py


@dataclass
class StaticConfig(StrategyConfig):
    name: str = "static"
    kind: str = "static"
    schedule: str = "continuous"  # pipeline: continuous (step k+1 enters as its tokens return) | gpipe (a bubble per step)
    kv_block: int = 256  # tokens per block of a rank's KV cache (the paged kernel's unit)

    KIND: ClassVar[str] = "static"

    def __post_init__(self):
        at_least("strategy", self, 1, "kv_block")
        need(self.schedule in SCHEDULES, f"strategy.schedule={self.schedule!r}: choose {' or '.join(SCHEDULES)}")
        super().__post_init__()

    def kv_unit(self) -> tuple[str, int]:
        return "strategy.kv_block", self.kv_block


@dataclass
class _StaticParts:
    """What a static step costs besides attention; it depends on the step's row count alone."""
    layer: float  # a layer's GEMMs, fixed costs, all-reduces and DCP's exchange, per micro-batch
    ar: float  # one all-reduce of the micro-batch's hidden states
    head: float  # LM head and its all-gather
    hop: float  # a pipeline message
    comm: float  # the step's communication (phases)


class StaticSpec(StrategySpec):
    kind = "static"
    config = StaticConfig
    family = "baseline"
    serves = True
    step_role = "stage"  # the role name of a stage's phases in a predicted step

    def kv_shards(self, s) -> int:
        """Ranks of a TP group that split every sequence's KV (DCP); 1: each holds its heads of every token."""
        return 1

    def spare_kv_tokens(self, s) -> int:
        """Tokens per sequence a rank allocates beyond the longest context."""
        return 0

    def build_engine(self, cfg, rank, world, device, dtype, timer):
        from model.parallel.static import StaticEngine

        return StaticEngine(cfg.model, cfg.strategy, rank, world, device, dtype, cfg.attention_backend, timer)

    # ---- memory and roofline ------------------------------------------------------------------------------
    def kv_bytes(self, cfg) -> int:
        """KV every layer holds, all heads: the engine (StageKV) gives every sequence room for the longest context,
        in whole blocks of kv_block tokens; a DCP shard room for its share of the blocks, k times the heads."""
        m, s = cfg.model, cfg.strategy
        k = self.kv_shards(s)
        row_tokens = math.ceil(math.ceil(max(context_lengths(cfg)) / s.kv_block) / k) * k * s.kv_block
        return cfg.workload.batch_size * (row_tokens + self.spare_kv_tokens(s)) * 2 * m.hidden * DTYPE_BYTES[cfg.hardware.dtype]

    def memory_by_role(self, cfg) -> list[RoleMemory]:
        m, s = cfg.model, cfg.strategy
        b = DTYPE_BYTES[cfg.hardware.dtype]
        k = self.kv_shards(s)
        embed = m.vocab_size * m.hidden * b  # the embedding; the head has the same size
        rows = math.ceil(cfg.workload.batch_size / max(s.micro_batches, 1))
        kv = self.kv_bytes(cfg)
        layers = m.n_layers // s.pp
        roles = []
        for stage in range(s.pp):
            w = layers * layer_params(m) * b // s.tp + (embed // s.tp if stage == 0 else 0) \
                + (embed // s.tp + m.hidden * b if stage == s.pp - 1 else 0)
            # DCP also holds the group's gathered q, k, v and the fp32 partials sent and received
            act = activations(m, rows, s.tp, b) + (rows * k * m.hidden // s.tp * (3 * b + 2 * 4) if k > 1 else 0)
            roles.append(RoleMemory(f"stage{stage}", s.tp, w, kv * layers // s.tp, act))
        return roles

    def kv_tokens_read(self, cfg, rank: dict) -> float:
        # a DCP rank reads k x the heads for 1/k of the tokens: the same as TP
        s, m = cfg.strategy, cfg.model
        lens, grown = context_tokens(cfg)
        return (sum(lens) + grown * len(lens)) * (m.n_layers // s.pp) / s.tp

    def serving_block_bytes(self, cfg) -> tuple[int, int, int]:
        m, s, sv = cfg.model, cfg.strategy, cfg.serving
        k = self.kv_shards(s)
        per_token_layer = 2 * m.hidden * DTYPE_BYTES[cfg.hardware.dtype]  # K and V of one token, one layer, all heads
        return sv.block_size * k, sv.block_size * per_token_layer * (m.n_layers // s.pp) * k // s.tp, 0

    # ---- the performance model ----------------------------------------------------------------------------
    def exchange_s(self, cal, links, s, m, rows, b, cross, graphed, merge=True) -> float:
        """What a layer adds per micro-batch beyond TP's GEMMs, all-reduces and attention (DCP's exchange)."""
        return 0.0

    def tp_prefill_layer_s(self, eager, s, tokens, h, b, cross, dense, before, own) -> float:
        """A prefill chunk's layer on one TP rank: its share of the GEMMs and attention (a KV shard attends over the
        chunk's own keys for k times the heads) and the two all-reduces of the chunk's activations."""
        tp, k = s.tp, self.kv_shards(s)
        return (dense + before) / tp + own * k / tp + 2 * eager("all_reduce", tp, tokens * h * b, cross)

    def add_prefill_exchange(self, layer, eager, copy_s, s, tokens, h, d, b, cross) -> float:
        """A prefill chunk's layer with what it adds beyond TP's (DCP's gather and partials, and the copies around
        them at copy_s(bytes read and written))."""
        return layer

    def decode_step(self, cfg, cal, links, bw, flops, b, ctx, gpn, eager, graphed):
        """Static TP x PP. A micro-batch's pass through a stage: its layers' GEMMs (weights read again for every
        micro-batch), attention over its KV shard, per-layer fixed costs and 2 all-reduces per layer, plus the
        embedding's all-reduce (stage 0) and the LM head with its all-gather (last stage). A step is M passes on
        the busiest stage, and at least one micro-batch's round trip through every stage and back (pp messages):
            continuous: max(M * t_stage, round trip)      gpipe: round trip + (M - 1) * t_stage"""
        parts = self.parts(cfg, cal, links, bw, flops, b, cfg.workload.batch_size, gpn, eager, graphed)
        return self.from_parts(cfg, cal, parts, bw, b, sum(ctx), eager)

    def parts(self, cfg, cal, links, bw, flops, b, batch, gpn, eager, graphed=None) -> _StaticParts:
        m, s = cfg.model, cfg.strategy
        tp, pp, M = s.tp, s.pp, max(1, s.micro_batches)
        rows = batch / M
        layers = m.n_layers // pp
        cross = tp > gpn
        graphed = (s.cuda_graphs if graphed is None else graphed) and not eager
        hidden_bytes = rows * m.hidden * b
        ar = collective_s(cal, links, "all_reduce", tp, hidden_bytes, cross, graphed)
        layer = layer_gemms_s(cal, m, rows, tp, b, bw, flops) + cal.layer_fixed_s + 2 * ar + \
            self.exchange_s(cal, links, s, m, rows, b, cross, graphed)
        head = gemm_s(cal, rows, m.hidden, m.vocab_size // tp, b, bw, flops) + \
            collective_s(cal, links, "all_gather", tp, rows * m.vocab_size // tp * 4, cross, graphed)
        hop = collective_s(cal, links, "p2p", 2, hidden_bytes, tp * pp > gpn, graphed=False) if pp > 1 else 0.0
        comm = M * (layers * (2 * ar + self.exchange_s(cal, links, s, m, rows, b, cross, graphed, merge=False))
                    + ar + (pp > 1) * hop)
        return _StaticParts(layer, ar, head, hop, comm)

    def from_parts(self, cfg, cal, parts: _StaticParts, bw, b, ctx_sum, eager, phases=True, attn_floor_s=0.0,
                   layer_extra_s=0.0):
        """decode_step from its row-count parts and the step's total context (ctx_sum tokens); phases=False: the
        step's seconds alone. attn_floor_s: a layer's attention is no shorter; layer_extra_s: added to each layer."""
        m, s = cfg.model, cfg.strategy
        tp, pp, M = s.tp, s.pp, max(1, s.micro_batches)
        layers = m.n_layers // pp
        attn = max(attn_s(cal, ctx_sum / M * 2 * m.hidden * b / tp, bw, eager), attn_floor_s) + layer_extra_s
        layer = parts.layer + attn
        stages = [layers * layer + (parts.ar if st == 0 else 0.0) + (parts.head if st == pp - 1 else 0.0) for st in range(pp)]
        round_trip = sum(stages) + pp * parts.hop if pp > 1 else stages[0]
        t_stage = max(stages)
        if pp == 1:
            step = M * t_stage
        elif s.schedule == "gpipe":
            step = round_trip + (M - 1) * t_stage
        else:
            step = max(M * t_stage, round_trip)
        eager_s = cal.eager_cpu_s_per_layer * m.n_layers if eager else 0.0
        step += eager_s
        if not phases:
            return step
        from harness.measure import PHASES

        busy = M * t_stage
        ph = dict.fromkeys(PHASES, 0.0)
        comm = parts.comm
        ph.update(attention=M * layers * attn, communication=comm, synchronization=max(0.0, step - busy - eager_s),
                  other=max(0.0, busy - M * layers * attn - comm) + eager_s)
        return step, {self.step_role: ph}, None

    def prefill_s(self, cfg, cal, bw, flops, links, gpn: int) -> float:
        """Chunk by chunk (harness/perfmodel.predict_prefill): 2 all-reduces of the chunk's activations per layer;
        the stages overlap over chunks x micro-batches, so the busiest stage's work plus a pipeline fill."""
        m, s = cfg.model, cfg.strategy
        h, layers, d = m.hidden, m.n_layers, m.head_dim
        b = DTYPE_BYTES[cfg.hardware.dtype]
        flops = flops * cal.prefill_flops_fraction
        eager = eager_collectives(cal, links)
        tp = s.tp
        cross = tp > gpn
        copy_s = prefill_copy_s(cal, bw)
        per_layer = []  # (seconds of one layer of this chunk on the critical path)
        for start, rows, tokens, before, own, dense in prefill_chunks(cfg, flops):
            layer = self.tp_prefill_layer_s(eager, s, tokens, h, b, cross, dense, before, own)
            per_layer.append(self.add_prefill_exchange(layer, eager, copy_s, s, tokens, h, d, b, cross))
        lens = prompt_lengths(cfg.workload)
        head = 2 * len(lens) * h * m.vocab_size / (flops * s.tp)
        if s.pp == 1:
            return layers * sum(per_layer) + head
        units = len(per_layer) * max(1, s.micro_batches)  # what flows through the stages
        stage = layers // s.pp * sum(per_layer)
        return stage * (1 + (s.pp - 1) / units) + head

    def serving_config(self, s):
        """A pass is one micro-batch through the stages in turn."""
        return dataclasses.replace(s, micro_batches=1, schedule="gpipe")

    def serving_graphed(self, s) -> bool:
        return s.pp == 1 and s.cuda_graphs

    prices_decode_by_totals = True

    def serving_decode_s(self, pricer, decode_ctx, decode_pooled) -> float:
        return self.decode_totals_s(pricer, len(decode_ctx), int(sum(decode_ctx)), int(max(decode_ctx)))

    def decode_totals_s(self, pricer, rows: int, ctx_sum: int, ctx_max: int) -> float:
        """A decode pass costs its row count's GEMMs, collectives and fixed costs (computed once per row count) plus
        attention over the rows' total context (ctx_sum), no shorter than the paged kernel's longest program."""
        parts = pricer.cache.get(("parts", rows))
        if parts is None:
            parts = pricer.cache["parts", rows] = self.parts(pricer.cfg, pricer.cal, pricer.links, pricer.bw,
                                                             pricer.flops, pricer.b, rows, pricer.gpn, False,
                                                             pricer.graphed)
        return self.from_parts(pricer.cfg, pricer.cal, parts, pricer.bw, pricer.b, ctx_sum, False,
                               phases=False, attn_floor_s=self.longest_program_s(pricer, rows, ctx_max, ctx_sum),
                               layer_extra_s=pricer.cal.serving_layer_s) + self.plan_build_s(pricer, rows)

    def plan_build_s(self, pricer, rows: int) -> float:
        """The ragged plan's build for a pass of this many rows (its bucket's, where the pass replays a graph), as
        the pricer says the engine built it (ServingPricer.plan_build): its tiles of items x rows compared side by
        side, one program a tile, once a pass ("pass_tiles": ragged_plan_pass_s), or in turn by one program
        (ragged_plan_tile_s a tile), once a pass ("pass") or once a layer ("layer")."""
        if pricer.decode_plan != "ragged":
            return 0.0
        if pricer.plan_build == "pass_tiles":  # the tiles side by side: one build's time
            return pricer.cal.ragged_plan_pass_s
        build_s = pricer.cache.get(("plan", rows))
        if build_s is None:  # one program compares the tiles in turn
            from model.paged_attention import plan_kernel_tiles

            cfg = pricer.cfg
            n = self.pass_rows(pricer, rows)
            builds = cfg.model.n_layers // cfg.strategy.pp if pricer.plan_build == "layer" else 1
            tiles = plan_kernel_tiles(n, n + self.ragged_plan_sizes(pricer)[0])
            build_s = pricer.cache["plan", rows] = builds * tiles * pricer.cal.ragged_plan_tile_s
        return build_s

    def pass_rows(self, pricer, rows: int) -> int:
        """The rows a decode pass of `rows` runs: its bucket's (padding included) where the pass replays a graph."""
        from model.parallel.static import decode_buckets

        if not pricer.graphed:
            return rows
        return next((b for b in decode_buckets(pricer.cfg.serving.max_batch) if b >= rows), rows)

    def ragged_plan_sizes(self, pricer) -> tuple[int, int]:
        """(target_items, min_chunk) of the serving engines' RaggedPlan on a rank of this config."""
        from model.paged_attention import RAGGED_PROGRAMS_PER_SM, ragged_plan_sizes

        cfg = pricer.cfg
        return ragged_plan_sizes(cfg.model.n_heads // cfg.strategy.tp, cfg.hardware.sm_count,
                                 programs_per_sm=RAGGED_PROGRAMS_PER_SM)

    def longest_program_s(self, pricer, rows: int, ctx_max: int, ctx_sum: int) -> float:
        """The paged kernel's longest program under the pricer's decode plan, at paged_token_s per token it walks:
        the longest row's program walks the row, or its share if shorter.
        ragged: shares are chunks of the step's total context (ctx_sum) over the plan's target items
        (RaggedPlan: RAGGED_PROGRAMS_PER_SM x SMs programs over the heads), never under its minimum chunk.
        splits: rows x heads x splits programs, the splits sized by the block table's width (a captured pass runs
        its bucket's rows, padding included)."""
        if pricer.decode_plan == "ragged":
            return min(ctx_max, self.ragged_chunk_tokens(pricer, ctx_sum)) * pricer.cal.paged_token_s
        cfg, bs = pricer.cfg, pricer.cfg.serving.block_size
        width = pricer.table_tokens or -(-ctx_max // bs) * bs
        split_tokens = pricer.cache.get(("split", rows, width))
        if split_tokens is None:
            from model.paged_attention import TILE_TOKENS, choose_splits

            splits = choose_splits(self.pass_rows(pricer, rows), cfg.model.n_heads // cfg.strategy.tp, width,
                                   cfg.hardware.sm_count)
            split_tokens = pricer.cache["split", rows, width] = -(-(-(-width // splits)) // TILE_TOKENS) * TILE_TOKENS
        return min(ctx_max, split_tokens) * pricer.cal.paged_token_s

    def ragged_chunk_tokens(self, pricer, ctx_sum: int) -> int:
        """RaggedPlan's chunk for a pass of ctx_sum tokens in all, at the serving engines' programs per SM."""
        from model.paged_attention import ragged_chunk_tokens

        return ragged_chunk_tokens(ctx_sum, *self.ragged_plan_sizes(pricer))

    def serving_prefill_masked(self, rows: int) -> bool:
        """Whether a serving prefill pass of `rows` rows attends through one mask (model/parallel/serving_kv.
        ServingAttention) rather than row by row."""
        from model.parallel.serving_kv import ROWS_ONE_BY_ONE

        return rows > ROWS_ONE_BY_ONE

    def serving_prefill_host_s(self, cfg, cal) -> float:
        """The host's time to launch one eager serving prefill pass on a stage: its layers' kernels."""
        return cfg.model.n_layers // cfg.strategy.pp * cal.serving_prefill_host_layer_s

    def serving_prefill_s(self, cfg, cal, links, bw, flops, b, gpn, starts, lens, pooled, one_mask=False) -> float:
        """As prefill_s prices a chunk, at the rates of a profiled serving prefill pass (GEMMs at the GEMM rate,
        attention at serving_prefill_attn_flops_fraction of it, the elementwise rest: serving_prefill_rest_s), plus
        what the serving engine adds: every row's earlier keys and values gathered out of its blocks into a dense
        copy per layer (serving_gather_s), and the rows padded to the longest chunk (the pass's tokens are [rows,
        longest chunk]: its GEMMs and collectives run on every padded position, no shorter than the weights' read).
        Attention, row by row (few rows): each row's own chunk over its own keys. Through one mask (more rows, serving_prefill_masked, or a bucket graph's pass): every
        row gathers the keys the pass spans (the longest row's start + chunk), and every padded query attends over
        all of them (costs.masked_attn_s). A KV shard of k (DCP) gathers 1/k of those keys for k times the heads: the
        same FLOPs and bias, 1/k of the mask."""
        s, m = cfg.strategy, cfg.model
        h, d = m.hidden, m.head_dim
        flops_p = flops * cal.serving_prefill_attn_flops_fraction
        starts, lens = list(starts), list(lens)
        rows, width = len(lens), max(lens)
        tokens = rows * width
        tp = s.tp
        if one_mask or self.serving_prefill_masked(rows):
            upto = max(a + q for a, q in zip(starts, lens))
            pairs = rows * width * upto  # (row, query, key) the kernel computes
            before = own = 0.0
            gathered = rows * upto * 2 * h * b
            masked = masked_attn_s(cal, flops, bw, pairs, m.n_heads // tp, d, b, 1 / self.kv_shards(s))
        else:
            before, own = (f / flops_p for f in rows_prefill_attn_flops(h, starts, lens))
            gathered = rows_cached_kv_bytes(h, b, starts, lens)
            masked = 0.0
        dense = tp * serving_prefill_gemms_s(cal, m, tokens, tp, b, bw, flops)  # the group's (a rank's: 1/tp)
        eager = eager_collectives(cal, links)
        cross = tp > gpn
        layer = self.tp_prefill_layer_s(eager, s, tokens, h, b, cross, dense, before, own) + masked
        layer += serving_gather_s(cal, gathered / tp, bw) + serving_prefill_rest_s(cal, tokens, h, tp, b, bw)
        layer = self.add_prefill_exchange(layer, eager, prefill_copy_s(cal, bw), s, tokens, h, d, b, cross)
        hops = (s.pp - 1) * eager("p2p", 2, tokens * h * b, tp * s.pp > gpn) if s.pp > 1 else 0.0
        return m.n_layers * layer + hops + serving_prefill_head_s(cal, m, rows, tp, b, bw, flops)


register(StaticSpec())
