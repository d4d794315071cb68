"""FA Pool (model/parallel/fa_pool*.py): a TP base group holds the weights and the KV of short sequences; a pool
of ranks holds only the KV of sequences above a threshold, block-wise, attends over it and sends fp32 partials
back, merged by their LSE (reduced within a node first when hierarchical), overlapped with the base's work."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from harness.costs import (attn_s, collective_s, eager_collectives, gemm_s, masked_attn_s, prefill_chunks,
                           serving_gather_s, serving_prefill_gemms_s, serving_prefill_head_s,
                           serving_prefill_rest_s)
from harness.fields import above, at_least, need
from harness.memory import DTYPE_BYTES, RoleMemory, activations, context_lengths, context_tokens
from harness.strategies.spec import StrategyConfig, StrategySpec, register
from harness.workload import prompt_lengths


@dataclass
class PoolConfig:
    size: int = 0  # attention-pool ranks in the world (beyond the base group)
    max_size: int = 32  # cap on the ranks one sequence may use (paper: 32)
    threshold: int = 4096  # sequences with more context tokens than this attend in the pool
    block_size: int = 256  # tokens per KV block in the pool
    policy: str = "proportional"  # pool ranks per sequence: proportional (ceil(len / tokens_per_rank)) | all
    tokens_per_rank: int = 4096  # the proportional policy's tokens per pool rank
    hierarchical: bool = True  # merge partials within a node, then across nodes; False = flat
    async_overlap: bool = True  # overlap pool attention of one micro-batch with base work of another
    # with async_overlap: micro-batch m of layer l + 1 starts when m of layer l finished, not after all of layer l
    # (the pool never waits for a whole layer of base work); off by default
    wavefront: bool = False
    # the prefill's rows in this many consecutive groups (at most one per row), taken through each chunk's layers in
    # wavefront order: the pool attends one group's layer while the base runs another's dense work (1: one group,
    # base and pool take turns)
    prefill_micro_batches: int = 2
    gpus_per_node: int = 8  # ranks per node, for the hierarchical reduction (tests pretend 2)
    kv_memory_fraction: float = 0.9  # of a pool GPU's free memory preallocated as KV blocks (capped at what the batch can use)

    def __post_init__(self):
        g = "strategy.pool"
        at_least(g, self, 0, "size")
        at_least(g, self, 1, "max_size", "gpus_per_node", "prefill_micro_batches")
        above(g, self, 0, "threshold", "block_size", "tokens_per_rank")
        need(self.size <= self.max_size, f"strategy.pool.size={self.size} exceeds strategy.pool.max_size={self.max_size}")
        need(self.policy in ("proportional", "all"), f"strategy.pool.policy={self.policy!r}: choose proportional or all")
        need(self.async_overlap or not self.wavefront,
             "strategy.pool.wavefront=true needs strategy.pool.async_overlap=true (it orders the overlapped units)")
        need(0 < self.kv_memory_fraction <= 1, f"strategy.pool.kv_memory_fraction={self.kv_memory_fraction} must be in (0, 1]")


@dataclass
class FAPoolConfig(StrategyConfig):
    name: str = "fa_pool"
    kind: str = "fa_pool"
    pool: PoolConfig = field(default_factory=PoolConfig)

    KIND: ClassVar[str] = "fa_pool"

    def kv_unit(self) -> tuple[str, int]:
        return "strategy.pool.block_size", self.pool.block_size


def eager_unit_s(cal, tp: int) -> float:
    """Host time of an eager FA Pool unit with a base of `tp` ranks (the nearest calibrated degree)."""
    if not cal.eager_unit_s:
        return 0.0
    return cal.eager_unit_s[min(cal.eager_unit_s, key=lambda t: (abs(t - tp), t))]


def threshold_between(ctx, pooled, default):
    """A threshold that puts exactly the pooled rows above it (the scheduler's decision, in the model's terms)."""
    ctx, pooled = list(ctx), list(pooled)
    short = [n for n, p in zip(ctx, pooled) if not p]
    return max(short) if short else (min(ctx) - 1 if ctx else default)


class FAPoolSpec(StrategySpec):
    kind = "fa_pool"
    config = FAPoolConfig
    family = "offload"
    serves = True

    # ---- layout and checks ------------------------------------------------------------------------------
    def world_size(self, s) -> int:
        return s.tp * s.pp + s.pool.size

    def pool_ranks(self, s) -> int:
        return s.pool.size

    def reduction_group(self, s) -> tuple[str, int] | None:
        return ("strategy.pool.gpus_per_node", s.pool.gpus_per_node) if s.pool.hierarchical else None

    def check(self, cfg) -> None:
        s = cfg.strategy
        need(s.pp == 1, f"strategy.pp={s.pp}: the FA Pool base group is tensor-parallel only; set strategy.pp=1")
        if cfg.fault.kind == "perturb_weight" and cfg.fault.rank < s.world_size:
            need(cfg.fault.rank < s.tp, f"fault.rank={cfg.fault.rank} is a pool rank, which holds no weights; pick a "
                 f"base rank 0..{s.tp - 1}")

    def build_engine(self, cfg, rank, world, device, dtype, timer):
        if cfg.workload.kind == "trace":  # a changing batch: the serving program of each role
            from model.parallel.fa_pool_serving import serving_engine

            return serving_engine(cfg.model, cfg.strategy, rank, world, device, dtype, cfg.attention_backend, timer)
        from model.parallel.fa_pool import fa_pool_engine  # the base's or a pool rank's program, by rank

        return fa_pool_engine(cfg.model, cfg.strategy, rank, world, device, dtype, cfg.attention_backend, timer)

    # ---- memory and roofline ------------------------------------------------------------------------------
    def memory_by_role(self, cfg) -> list[RoleMemory]:
        m, s = cfg.model, cfg.strategy
        b = DTYPE_BYTES[cfg.hardware.dtype]
        ctx = context_lengths(cfg)
        kv_token = 2 * m.hidden * b  # one token, one layer, all heads
        rows = math.ceil(cfg.workload.batch_size / max(s.micro_batches, 1))
        p = s.pool
        # the base preallocates a cache row of ceil(min(longest context, threshold) / block) blocks for every
        # sequence that starts short (model/parallel/fa_pool_plan.py), plus one trash block
        starts_short = [n for n in prompt_lengths(cfg.workload) if n <= p.threshold or p.size == 0]
        row_tokens = math.ceil(min(max(ctx), p.threshold if p.size else max(ctx)) / p.block_size) * p.block_size
        base_kv = (len(starts_short) * row_tokens + p.block_size) * kv_token * m.n_layers // s.tp
        base = RoleMemory("base", s.tp, m.param_count() * b // s.tp, base_kv, activations(m, rows, s.tp, b))
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

    def kv_tokens_read(self, cfg, rank: dict) -> float:
        s, m = cfg.strategy, cfg.model
        lens, grown = context_tokens(cfg)
        pooled = [n > s.pool.threshold for n in lens] if s.pool.size else [False] * len(lens)
        if rank["role"] == "base":
            return sum(n + grown for n, p in zip(lens, pooled) if not p) * m.n_layers / s.tp
        # a pool rank: the pooled tokens spread over the pool (the mean, which the fullest rank meets or exceeds)
        return sum(n + grown for n, p in zip(lens, pooled) if p) * m.n_layers / s.pool.size

    def serving_block_bytes(self, cfg) -> tuple[int, int, int]:
        m, s, sv = cfg.model, cfg.strategy, cfg.serving
        per_token_layer = 2 * m.hidden * DTYPE_BYTES[cfg.hardware.dtype]  # K and V of one token, one layer, all heads
        return sv.block_size, sv.block_size * per_token_layer * m.n_layers // s.tp, sv.block_size * per_token_layer * m.n_layers

    def serving_placement(self, cfg, block_tokens: int):
        """Where a request's KV goes, in the scheduler's terms; None without a pool."""
        from model.parallel.fa_pool_serving import pool_placement

        return pool_placement(cfg.strategy.pool, block_tokens) if cfg.strategy.pool.size else None

    # ---- the performance model ----------------------------------------------------------------------------
    def decode_step(self, cfg, cal, links, bw, flops, b, ctx, gpn, eager, graphed=None):
        """FA Pool. Per layer and micro-batch (a unit) the base computes QKV and its short rows' attention, sends
        q, k, v to the pool (one eager message per pool rank), the pool attends over its share of the pooled KV and
        sends fp32 partials back (a second level first at a node leader when hierarchical), the base merges, projects
        and runs the FFN (2 all-reduces). A unit's critical path is that chain. With async_overlap and M > 1 a
        layer's units overlap: the layer costs the busier side's M units plus one chain's messages; with wavefront
        the next layer's units start while this one finishes, so a layer costs the busier side's M units or one
        micro-batch's whole chain, whichever is longer. A pool unit lasts its attention and both its transfers (a
        pool rank receives, attends and sends unit after unit on one stream). Eager steps
        (a base of more than one rank) also pay the host's time per unit (cal.eager_unit_s): the host issues every
        kernel and message, so a step cannot be shorter than units x that time."""
        m, s = cfg.model, cfg.strategy
        p = s.pool
        M = max(1, s.micro_batches)
        rows = cfg.workload.batch_size / M
        thr = p.threshold if p.size > 0 else math.inf
        short = [n for n in ctx if n <= thr]
        long = [n for n in ctx if n > thr]
        # graphed: what a measured record says its steps ran; projections take strategy.cuda_graphs (captured)
        graphed = (s.cuda_graphs if graphed is None else graphed) and not eager
        cross_base = s.tp > gpn
        ar = collective_s(cal, links, "all_reduce", s.tp, rows * m.hidden * b, cross_base, graphed)
        h, f = m.hidden, m.ffn_hidden
        pre = gemm_s(cal, rows, h, 3 * h // s.tp, b, bw, flops) + \
            attn_s(cal, sum(short) / M * 2 * h * b / s.tp, bw, eager) + cal.layer_fixed_s / 2
        post = (gemm_s(cal, rows, h // s.tp, h, b, bw, flops) + gemm_s(cal, rows, h, f // s.tp, b, bw, flops)
                + gemm_s(cal, rows, f // s.tp, h, b, bw, flops) + 2 * ar + cal.layer_fixed_s / 2)
        pool_attn = transfers = handoffs = merge = 0.0
        if long:
            pool_attn = attn_s(cal, sum(long) / M * 2 * h * b / p.size, bw, eager)  # one unit's share
            pool_cross = (s.tp + p.size) > gpn
            q_msg = len(long) / M * 3 * h * b / s.tp / p.size  # q, k, v of its rows from one base rank to one pool rank
            part_msg = len(long) / M * (h * 4 + m.n_heads * 4) / s.tp  # fp32 partials + LSE back to one base rank
            # each hop: its transfer on the device (NCCL's in-graph time for the bytes) and, once, the host's handoff
            # (message_s: the exchange posted and waited on between captured segments). NCCL's eager time is no
            # transfer time: host-bound for small messages (limits.json), it would count the host a second time
            transfers = (collective_s(cal, links, "p2p", 2, q_msg, pool_cross, graphed=True)
                         + collective_s(cal, links, "p2p", 2, part_msg, pool_cross, graphed=True))
            handoffs = 2 * cal.message_s
            if p.hierarchical and p.size > 1:  # members -> leader first
                transfers += collective_s(cal, links, "p2p", 2, part_msg * s.tp, False, graphed=True)
                handoffs += cal.message_s
            merge = cal.merge_s
        messages = transfers + handoffs
        base_unit = pre + post + merge
        # a pool rank runs its units one after another on one stream, each unit's receive and send between its
        # attention kernels (model/parallel/fa_pool_pool_rank.py): a unit keeps the pool busy for both transfers
        pool_unit = pool_attn + transfers
        if p.async_overlap and p.wavefront and M > 1 and long:
            # a micro-batch's own chain (base unit, messages, pool unit) is the shortest cycle per layer; the M
            # micro-batches in flight keep the base and the pool busy otherwise
            layer = max(M * base_unit, M * pool_unit, base_unit + messages + pool_attn)
        elif p.async_overlap and M > 1 and long:
            # the base's M units then the last one's messages and pool attention, or the first one's base unit and
            # handoffs then the pool's M units
            layer = max(M * base_unit + messages + pool_attn, base_unit + handoffs + M * pool_unit)
        else:
            layer = M * (base_unit + messages + pool_attn)
        embed = ar
        head = gemm_s(cal, cfg.workload.batch_size, h, m.vocab_size // s.tp, b, bw, flops) + \
            collective_s(cal, links, "all_gather", s.tp, cfg.workload.batch_size * m.vocab_size // s.tp * 4, cross_base, graphed)
        step = m.n_layers * layer + embed + head
        # the host: resource management and the plan every step (overlapping the GPU's work), and when eager every
        # kernel and message of every unit: a step is never shorter than that
        host = cal.plan_s + (0.0 if graphed else m.n_layers * M * eager_unit_s(cal, s.tp))
        step = max(step, host)
        from harness.measure import PHASES, pool_utilization

        ph = dict.fromkeys(PHASES, 0.0)
        base_busy = m.n_layers * M * base_unit + embed + head
        ph.update(attention=m.n_layers * M * (pre - gemm_s(cal, rows, h, 3 * h // s.tp, b, bw, flops)),
                  communication=m.n_layers * (M * 2 * ar + messages), synchronization=max(0.0, step - base_busy),
                  other=max(0.0, base_busy - m.n_layers * M * 2 * ar))
        phases = {"base": ph}
        pool_busy = None
        if p.size:
            pph = dict.fromkeys(PHASES, 0.0)
            busy = m.n_layers * M * pool_attn
            pph.update(attention=busy, communication=m.n_layers * messages, resource_management=cal.plan_s,
                       synchronization=max(0.0, step - busy - cal.plan_s - m.n_layers * messages))
            phases["pool"] = pph
            pool_busy = pool_utilization(busy, cal.plan_s, step)
        return step, phases, pool_busy

    def prefill_layer_s(self, cfg, cal, eager, bw, rows, tokens, dense, before, own, start, gpn, b) -> float:
        """One layer of one FA Pool prefill chunk (every row long, the benchmark's case): see predict_prefill.
        Copies (read and written, at the calibrated fractions of the read bandwidth bw):
        - a pool rank: its share of the rows' keys and values before the chunk, gathered out of its blocks and laid out
          dense (2 passes); the received message unpacked and stored into its blocks; the fp32 partials converted,
          joined with the LSE and packed per base rank (~3.5 passes);
        - a base rank: its messages packed, the partials unpacked for the merge."""
        m, s = cfg.model, cfg.strategy
        tp, pool, h, d = s.tp, max(1, s.pool.size), cfg.model.hidden, cfg.model.head_dim
        cross = tp + s.pool.size > gpn
        local_heads_bytes = tokens * h // tp * b  # one base rank's heads of the chunk's tokens
        queries = local_heads_bytes if start else 0
        sent = pool * queries + 2 * local_heads_bytes  # what a base rank sends the pool
        partials = pool * (tokens * (h // tp) * (d + 1) // d * 4) if start else 0  # what it gets back (fp32)
        out, back = eager("p2p", 2, sent, cross), eager("p2p", 2, partials, cross)
        kv_before = rows * start * h * 2 * b / pool  # a pool rank's share, every head
        received = tp * (queries + 2 * local_heads_bytes / pool)
        pool_copies = 2 * (2 * kv_before + received + 2 * tokens * h * b / pool + 3.5 * partials * tp / pool)
        pool_copy = pool_copies / (bw * cal.prefill_pool_copy_bw_fraction)
        base_copy = 2 * (sent + partials) / (bw * cal.prefill_base_copy_bw_fraction)
        base = dense / tp + 2 * eager("all_reduce", tp, tokens * h * b, tp > gpn) + base_copy
        pool_side = out + before / pool + pool_copy + back
        groups = min(s.pool.prefill_micro_batches, cfg.workload.batch_size)  # as the engine: at most one per row
        if groups == 1:
            return base + out + max(own / tp, before / pool + pool_copy) + back
        # in groups the busier side decides, plus one group's layer of the other side at each end of the chunk (the
        # base's first group before the pool can start, the pool's last one before the base can finish)
        return max(base + own / tp, pool_side) + 2 * min(base + own / tp, pool_side) / groups / m.n_layers


    def prefill_s(self, cfg, cal, bw, flops, links, gpn: int) -> float:
        """Chunk by chunk (harness/perfmodel.predict_prefill): the base runs every dense layer (tp ranks) and the
        chunk's causal attention; each pool rank gets the long rows' queries and its share of the chunk's K/V,
        attends over its share of the keys before the chunk, and sends fp32 partials back. One prefill group: base
        and pool take turns each layer (the pool's attention overlaps only the base's own causal part); several
        (strategy.pool.prefill_micro_batches): a layer costs the busier side, plus one group's turn of the other
        side at each end of a chunk; both sides' copies at their calibrated rates."""
        m, s = cfg.model, cfg.strategy
        b = DTYPE_BYTES[cfg.hardware.dtype]
        flops = flops * cal.prefill_flops_fraction
        eager = eager_collectives(cal, links)
        per_layer = [self.prefill_layer_s(cfg, cal, eager, bw, rows, tokens, dense, before, own, start, gpn, b)
                     for start, rows, tokens, before, own, dense in prefill_chunks(cfg, flops)]
        lens = prompt_lengths(cfg.workload)
        head = 2 * len(lens) * m.hidden * m.vocab_size / (flops * s.tp)
        return m.n_layers * sum(per_layer) + head

    def serving_config(self, s):
        """A pass is one micro-batch; base and pool take turns in a layer and merge flat; one prefill group."""
        pool = dataclasses.replace(s.pool, async_overlap=False, wavefront=False, hierarchical=False, prefill_micro_batches=1)
        return dataclasses.replace(s, micro_batches=1, pool=pool)

    def serving_decode_s(self, pricer, decode_ctx, decode_pooled) -> float:
        cfg, s = pricer.cfg, pricer.cfg.strategy
        lens = [max(1, int(n) - 1) for n in decode_ctx]  # mean_context_lengths adds output_tokens // 2 = 1
        # the scheduler's placement decides; the model's threshold must agree with it
        pool = dataclasses.replace(s.pool, threshold=threshold_between(decode_ctx, decode_pooled, s.pool.threshold))
        step_cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(s, pool=pool),
                                       workload=dataclasses.replace(cfg.workload, batch_size=len(lens), prompt_lens=lens,
                                                                    buckets=[], output_tokens=2))
        return self.decode_step(step_cfg, pricer.cal, pricer.links, pricer.bw, pricer.flops, pricer.b,
                                [int(n) for n in decode_ctx], pricer.gpn, False, pricer.graphed)[0]

    def serving_prefill_host_s(self, cfg, cal) -> float:
        """The host's time to launch one serving prefill pass: the base runs it eagerly, at least the static
        engine's kernels of its layers (model/parallel/fa_pool_serving: no graphs, its attention core sends)."""
        return cfg.model.n_layers * cal.serving_prefill_host_layer_s

    def blocks_per_rank_run(self, cfg) -> int:
        """The blocks a row places on one pool rank before the next (the scheduler's placement,
        model/parallel/fa_pool_serving.pool_placement: the proportional policy's tokens_per_rank in blocks; one block
        a rank, round robin, otherwise)."""
        p, bs = cfg.strategy.pool, cfg.serving.block_size
        return -(-p.tokens_per_rank // bs) if p.policy == "proportional" else 1

    def pool_keys_per_rank(self, cfg, ctx: int) -> int:
        """The most keys of a row of ctx tokens that one pool rank holds: runs of blocks_per_rank_run blocks, round
        robin over the pool when the row outgrows it."""
        bs, per_rank = cfg.serving.block_size, self.blocks_per_rank_run(cfg)
        blocks = -(-ctx // bs)
        return min(blocks, -(-blocks // (cfg.strategy.pool.size * per_rank)) * per_rank) * bs

    def pool_ranks_storing(self, cfg, start: int, new: int) -> int:
        """The pool ranks that hold a block of a pooled row's new positions [start, start + new): the runs of
        blocks_per_rank_run blocks they touch (at most the pool)."""
        run = self.blocks_per_rank_run(cfg) * cfg.serving.block_size
        return min(cfg.strategy.pool.size, (start + new - 1) // run - start // run + 1)

    def serving_prefill_s(self, cfg, cal, links, bw, flops, b, gpn, starts, lens, pooled, one_mask=False) -> float:
        """A pass as model/parallel/fa_pool_serving runs it, per layer, base and pool in turn:
        - the base (tp ranks): the GEMMs and two all-reduces over every row's padded chunk; its rows' earlier keys
          gathered dense up to the span of its own rows (costs.serving_gather_s) and every padded query
          attended through one mask (costs.masked_attn_s); the pooled rows' q sent to each pool rank in use, their
          k and v too to the ranks that store the chunk's blocks (pool_ranks_storing), and their fp32 partials
          received (one message each way per pool rank), merged by LSE (the stacked partials zeroed, filled and
          read: 3 passes);
        - the busiest pool rank: the tp messages joined (read and written), its blocks of the pooled rows gathered
          (pool_keys_per_rank of the longest row, read and written), every head's padded queries over them through
          one mask, the partials packed (read and written)."""
        s, m = cfg.strategy, cfg.model
        h, d, tp = m.hidden, m.head_dim, s.tp
        starts, lens, pooled = list(starts), list(lens), list(pooled)
        rows, width = len(lens), max(lens)
        tokens = rows * width
        eager = eager_collectives(cal, links)
        base_bw = bw * cal.prefill_base_copy_bw_fraction
        layer = serving_prefill_gemms_s(cal, m, tokens, tp, b, bw, flops)
        layer += serving_prefill_rest_s(cal, tokens, h, tp, b, bw)
        layer += 2 * eager("all_reduce", tp, tokens * h * b, tp > gpn)
        span = max((a + q for a, q, p in zip(starts, lens, pooled) if not p), default=0)
        if span:
            layer += masked_attn_s(cal, flops, bw, tokens * span, m.n_heads // tp, d, b)
            layer += serving_gather_s(cal, rows * span * 2 * h // tp * b, bw)
        long = [a + q for a, q, p in zip(starts, lens, pooled) if p]
        if long:
            p = s.pool
            used = p.size if p.policy != "proportional" else min(p.size, max(-(-c // p.tokens_per_rank) for c in long))
            cross = tp + p.size > gpn
            n = len(long)
            q_bytes = n * width * h // tp * b  # one base rank's q of the pooled rows (k and v: as much each)
            msg = 3 * q_bytes  # to a rank that stores new tokens: q, k, v
            part = n * width * m.n_heads // tp * (d + 1) * 4  # its heads' fp32 partials and LSE, back from one
            storing = min(used, sum(self.pool_ranks_storing(cfg, a, q) for a, q, p in zip(starts, lens, pooled) if p))
            layer += eager("p2p", 2, used * q_bytes + storing * 2 * q_bytes, cross) + eager("p2p", 2, used * part, cross)
            layer += 3 * (1 + used) * tokens * m.n_heads // tp * (d + 1) * 4 / base_bw
            keys = max(self.pool_keys_per_rank(cfg, c) for c in long)
            pool_bw = bw * cal.prefill_pool_copy_bw_fraction
            pool_copies = 2 * (tp * msg + n * keys * 2 * h * b + tp * part)
            layer += masked_attn_s(cal, flops, bw, n * width * keys, m.n_heads, d, b) + pool_copies / pool_bw
        return m.n_layers * layer + serving_prefill_head_s(cal, m, rows, tp, b, bw, flops)


register(FAPoolSpec())
