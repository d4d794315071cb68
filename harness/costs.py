"""The cost primitives every strategy's performance model is built from: a GEMM, a decode attention kernel, a
layer's GEMMs, one GPU's step, a collective or message at NCCL's measured time (or the link model across nodes),
and a hardware preset's rates under a calibration (harness/calibration.py)."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from harness.memory import DTYPE_BYTES

LINK_LATENCY_S = {"nvlink": 5e-6, "ib": 10e-6}  # per message (assumed; NCCL small-message latency order)


def op_time(comm: dict, op: str, group: int, nbytes: float) -> float:
    """Seconds of one `op` of `nbytes` per rank in a group of `group` ranks: log-log interpolation between the
    calibrated sizes; below the smallest, its time (latency-bound); above the largest, its bandwidth."""
    if op not in comm and op == "all_to_all":  # calibrations before it was measured: the same bytes per peer
        op = "all_gather"
    table = comm[op].get(str(group)) or comm[op][max(comm[op], key=int)]  # an uncalibrated size: the largest group
    sizes = [b for b, _ in table]
    if nbytes <= sizes[0]:
        return table[0][1]
    if nbytes >= sizes[-1]:
        return table[-1][1] * nbytes / sizes[-1]
    i = bisect.bisect_right(sizes, nbytes)
    (b0, t0), (b1, t1) = table[i - 1], table[i]
    f = (math.log(nbytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
    return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))


def gemm_s(cal, rows, k, n, b, bw, flops):
    nbytes = (k * n + rows * (k + n)) * b
    return max(2 * rows * k * n / flops, nbytes / (bw * cal.gemm_bw_fraction)) + cal.gemm_fixed_s


def attn_s(cal, kv_bytes, bw, eager=False):
    if kv_bytes <= 0:
        return 0.0
    if eager:
        return kv_bytes / (bw * cal.attn_bw_fraction_eager) + cal.attn_fixed_eager_s
    return kv_bytes / (bw * cal.attn_bw_fraction) + cal.attn_fixed_s


def layer_gemms_s(cal, m, rows, tp, b, bw, flops):
    h, f = m.hidden, m.ffn_hidden
    return (gemm_s(cal, rows, h, 3 * h // tp, b, bw, flops) + gemm_s(cal, rows, h // tp, h, b, bw, flops)
            + gemm_s(cal, rows, h, f // tp, b, bw, flops) + gemm_s(cal, rows, f // tp, h, b, bw, flops))


def serving_prefill_gemms_s(cal, m, tokens, tp, b, bw, flops):
    """One TP rank's GEMMs of a serving prefill pass's layer over `tokens` padded positions: at the GEMM rate, and no
    shorter than reading the rank's weights (a small pass, a few tokens a row, is bound by them)."""
    return layer_gemms_s(cal, m, tokens, tp, b, bw, flops)


def serving_prefill_head_s(cal, m, rows, tp, b, bw, flops):
    """One TP rank's LM head of a serving prefill pass: each row's last position against its share of the vocabulary."""
    return gemm_s(cal, rows, m.hidden, m.vocab_size // tp, b, bw, flops)


def serving_prefill_rest_s(cal, tokens, h, tp, b, bw):
    """One TP rank's elementwise work of a serving prefill pass's layer over `tokens` padded positions (norms,
    rotary, activation, residuals, cache writes): serving_prefill_elementwise_passes of its activations."""
    return cal.serving_prefill_elementwise_passes * tokens * h // tp * b / bw


def rows_prefill_attn_flops(h, starts, lens) -> tuple[float, float]:
    """FLOPs of one layer's attention, all heads, over prefill chunks of `lens` tokens after `starts` cached ones,
    each row over its own keys: (the chunks' queries over the keys before them, over their own keys causally)."""
    return sum(4 * h * q * a for q, a in zip(lens, starts)), sum(4 * h * q * (q + 1) / 2 for q in lens)


def rows_cached_kv_bytes(h, b, starts, lens) -> int:
    """Keys and values, all heads, of one layer of every row up to its chunk's end: what a serving prefill pass
    attending row by row gathers out of the blocks."""
    return sum(a + q for a, q in zip(starts, lens)) * 2 * h * b


def serving_gather_s(cal, nbytes, bw):
    """Gathering `nbytes` of cached keys and values out of their blocks for a prefill pass's attention: two copies
    (read and written each) at serving_gather_bw_fraction of the read bandwidth."""
    return 4 * nbytes / (bw * cal.serving_gather_bw_fraction)


def gpu_step_s(cal, m, rows, ctx, tp, bw, flops, b, eager=False):
    """One GPU's decode step over `rows` sequences of contexts `ctx`, weights split tp ways (no comm)."""
    kv = sum(ctx) * 2 * m.hidden * b // tp
    per_layer = layer_gemms_s(cal, m, rows, tp, b, bw, flops) + attn_s(cal, kv, bw, eager) + cal.layer_fixed_s
    head = gemm_s(cal, rows, m.hidden, m.vocab_size // tp, b, bw, flops)
    return m.n_layers * per_layer + head


@dataclass
class Links:
    nvlink_bw: float
    ib_bw: float

    def send_s(self, nbytes: float, cross_node: bool) -> float:
        if nbytes <= 0:
            return 0.0
        bw, lat = (self.ib_bw, LINK_LATENCY_S["ib"]) if cross_node else (self.nvlink_bw, LINK_LATENCY_S["nvlink"])
        return lat + nbytes / bw

    def allreduce_s(self, nbytes: float, n: int, cross_node: bool) -> float:
        if n <= 1:
            return 0.0  # ring: 2 (n-1) steps of nbytes / n each
        return 2 * (n - 1) * self.send_s(nbytes / n, cross_node)


# bytes per (row, query, key) of the mask a pass through one mask builds (model/attention.visible_mask: the boolean
# mask made and narrowed twice, 7; _aligned_bias: the bias filled and masked, 7; the empty-row test, 1)
MASK_BYTES_PER_ELEMENT = 15


def masked_attn_s(cal, flops, bw, pairs, heads, head_dim, b, mask_share=1.0):
    """One rank's attention through one mask over `pairs` (row, query, key) triples of `heads` heads (the serving
    engines' prefill passes): the mem-efficient kernel computes every triple at masked_attn_flops_fraction of the
    GEMM rate and reads the head-broadcast bias once per head, after the mask and bias are built
    (MASK_BYTES_PER_ELEMENT per triple, times mask_share where the mask spans a share of the keys), at the read
    bandwidth bw."""
    return (4 * heads * head_dim * pairs / (flops * cal.masked_attn_flops_fraction)
            + pairs * (MASK_BYTES_PER_ELEMENT * mask_share + heads * b) / bw)


def collective_s(cal, links, op, group, nbytes, cross_node, graphed=True):
    """One collective or message of `nbytes` per rank: NCCL's measured time (cal.comm, one node) where there is
    one, else the link model (latency + bytes / bandwidth; always across nodes: no inter-node measurement)."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    if cal.comm and not cross_node:
        return op_time(cal.comm["graph" if graphed else "eager"], op, group, nbytes)
    if op == "all_reduce":
        return links.allreduce_s(nbytes, group, cross_node)
    if op in ("all_gather", "all_to_all"):
        return (group - 1) * links.send_s(nbytes, cross_node)
    return links.send_s(nbytes, cross_node)


def rates(cfg, cal):
    """(element bytes, read bandwidth, GEMM FLOP/s, links, GPUs per node) of cfg's hardware under cal."""
    hw = cfg.hardware
    bw = cal.read_bw or (hw.hbm_gbps * 1e9 * cal.read_bw_fraction if hw.hbm_gbps else 2.9e12)
    flops = hw.peak_tflops * 1e12 * cal.gemm_flops_fraction if hw.peak_tflops else 750e12
    links = Links(hw.nvlink_gbps * 1e9 or 300e9, hw.ib_gbps * 1e9 or 25e9)
    return DTYPE_BYTES[hw.dtype], bw, flops, links, (hw.gpus_per_node if hw.gpus_per_node > 1 else 8)


def eager_collectives(cal, links):
    """collective_s at NCCL's eager time (prefill passes run eagerly): f(op, group, nbytes, cross_node)."""
    def eager(op, group, nbytes, cross):
        return collective_s(cal, links, op, group, nbytes, cross, graphed=False)
    return eager


def prefill_copy_s(cal, bw):
    """Seconds of a prefill's elementwise copies (conversions, packing, transposes) that read and write `nbytes` in
    all: f(nbytes), at the rate fitted on FA Pool's pool-side prefill copies, which are kernels of the same kinds."""
    def copy_s(nbytes):
        return nbytes / (bw * cal.prefill_pool_copy_bw_fraction)
    return copy_s


def prefill_chunks(cfg, flops):
    """The workload's prefill chunk by chunk as the engines run it (strategy.prefill_chunk tokens; whole prompts
    when 0): per chunk (start, rows with tokens in it, tokens, and at `flops` the seconds of attention over the
    keys before it, of its causal attention over itself, and of its layer's GEMMs), the whole model, all heads."""
    from harness.workload import prompt_lengths

    m, s = cfg.model, cfg.strategy
    h = m.hidden
    lens = prompt_lengths(cfg.workload)
    chunk = s.prefill_chunk or max(lens)
    dense_per_token = 2 * (4 * h * h + 2 * h * m.ffn_hidden)  # one layer's GEMM FLOPs per token
    for start in range(0, max(lens), chunk):
        new = [min(chunk, max(0, n - start)) for n in lens]
        tokens = sum(new)
        yield (start, sum(1 for q in new if q), tokens, sum(4 * h * q * start for q in new) / flops,
               sum(4 * h * q * (q + 1) / 2 for q in new) / flops, tokens * dense_per_token / flops)
