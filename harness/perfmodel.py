"""The performance model: time per decode step (and prefill) for any (model, strategy, workload, hardware), from
shapes, bytes and FLOPs against calibrated efficiencies; memory per role lives in harness/memory.py.
Assumptions are in the README."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from harness.config import BenchConfig, from_dict
from harness.measure import PHASES, pool_utilization
from harness.roofline import op_time
from harness.memory import DTYPE_BYTES, check_fits, mean_context_lengths, memory_by_role
from harness.workload import prompt_lengths
from model.config import PRESETS
from model.paged_attention import TILE_TOKENS, choose_splits
from model.parallel.static import decode_buckets

# ----------------------------------------------------------------------------------------------------------
# Time: a decode step (and prefill) per phase, from bytes and FLOPs against calibrated efficiencies.
# ----------------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
CALIBRATION_SET = ROOT / "results" / "measured" / "h100-x1" / "bench_gpu.json"  # one GPU: GEMMs, merge, floors
MEASURED_SET = ROOT / "results" / "measured" / "h200-x4" / "bench"  # 4 GPUs: paged kernel, NCCL, FA Pool host costs
SERVING_DECODE_SET = ROOT / "results" / "measured" / "h200-x1" / "serve"  # one GPU: serving decode steps (Calibration)
LINK_LATENCY_S = {"nvlink": 5e-6, "ib": 10e-6}  # per message (assumed; NCCL small-message latency order)
# Small kernels a decode layer launches besides its GEMMs and attention (model/transformer.py), by how the engine
# runs RMSNorm and rotary: "unfused" (code before 2da58f1, and the one-GPU benchmark that fits the floor per
# kernel): each norm in 8 torch ops (cast, square, mean, add, rsqrt, scale, cast, weight) and rotary per q and k in
# 17 (its angle table, fp32 casts of both halves, 6 products and sums, a concatenation, a cast); "fused": one
# kernel per norm (F.rms_norm), the angle table once per layer (7) and one Triton kernel per q and k. Both also
# launch 6 others (2 residual adds, GELU, the cache write of k and v, the new lengths).
SMALL_KERNELS_PER_LAYER = {"unfused": 2 * 8 + 2 * 17 + 6, "fused": 2 * 1 + 7 + 2 + 6}


@dataclass
class Calibration:
    """Fractions of a GPU's datasheet limits, and fixed costs, fitted on one GPU's micro-benchmarks.

    Fractions carry over to another GPU by multiplying its own peaks; fixed costs (seconds) are kept.
    """

    source: str = "defaults (no measured set found)"
    read_bw_fraction: float = 0.87  # measured HBM read bandwidth / datasheet
    gemm_flops_fraction: float = 0.76  # measured 8192^3 GEMM / datasheet
    attn_bw_fraction: float = 1.0  # attention KV streaming / measured read bandwidth (cuDNN)
    attn_fixed_s: float = 40e-6  # a decode attention kernel's floor
    attn_bw_fraction_eager: float = 0.9  # the same for the kernel eager engines use (flash: no per-shape plan)
    attn_fixed_eager_s: float = 40e-6
    gemm_bw_fraction: float = 0.6  # small-batch GEMM weight streaming / measured read bandwidth
    gemm_fixed_s: float = 10e-6  # a GEMM kernel's floor
    layer_fixed_s: float = 20e-6  # norms, rotary, residuals, cache writes per layer (graphed): kernel_s x their count
    kernel_s: float = 20e-6 / SMALL_KERNELS_PER_LAYER["fused"]  # one small kernel's floor in a graphed step
    eager_cpu_s_per_layer: float = 0.0  # Python/launch time per layer when not graphed (eager engines)
    merge_s: float = 36e-6  # LSE merge of one micro-batch's partials (graphed)
    read_bw: float | None = None  # a measured set's read bandwidth (bytes/s); None: datasheet x read_bw_fraction
    comm: dict | None = None  # NCCL seconds per op on one node, {"graph"|"eager": {op: {group: [[bytes, s]]}}}
    message_s: float = 0.0  # host cost of one eager exchange on FA Pool's critical path (post, wait)
    # host time of one eager FA Pool unit (a layer and micro-batch: kernels, collectives, messages) by the base's
    # TP degree, which decides the unit's collectives; a degree not measured takes the nearest one's
    eager_unit_s: dict = dataclasses.field(default_factory=dict)
    plan_s: float = 0.47e-3  # FA Pool's resource management + plan per step on the host, a pool rank at paper scale
    #                          (the CPU benchmark harness/bench_plan.py measures it)
    calibration_records: tuple = ()  # records a set's calibration was fitted on (not validation)
    # the rate a chunked prefill's FLOPs run at, as a fraction of the GEMM rate: attention, norms, rotary and
    # cache writes run below the GEMM peak (fitted on a set's one-GPU reference records with a real prefill)
    prefill_flops_fraction: float = 1.0
    # FA Pool's prefill copies (a pool rank gathers its blocks into dense keys, a base rank
    # packs its messages and unpacks the partials) at these fractions of the read bandwidth: fitted on two FA Pool
    # prefill records (SET_CALIBRATION), 1.0 (the bandwidth itself, a lower bound) without them
    prefill_pool_copy_bw_fraction: float = 1.0
    prefill_base_copy_bw_fraction: float = 1.0
    prefill_calibration_records: tuple = ()  # records the prefill's copy rates were fitted on (not validation)
    # A serving decode pass (harness/perfmodel.ServingPricer), fitted on the one-H200 serving set's decode steps at
    # 0.5 and 1 req/s (harness/serving/virtual.fit_serving_decode, 1 to 23 rows; SERVING_DECODE_SET):
    # - paged_token_s: one program of the paged kernel walks its split of a row at this time per token (a head's K
    #   and V: 512 bytes in bf16); the kernel sizes its splits by the block table's width, not the rows' lengths,
    #   so a few rows' attention takes the longest program's walk however little KV they hold in all
    # - serving_layer_s: per layer, what the pass spends beyond the kernels counted (small-batch GEMMs below the
    #   calibrated streaming rate, the split merge, the table's reads); not broken down: no profile of it yet
    paged_token_s: float = 39.6e-9
    serving_layer_s: float = 56.9e-6

    @classmethod
    def from_bench(cls, path: Path = CALIBRATION_SET, datasheet_bw: float = 3.35e12, datasheet_flops: float = 989e12):
        if not Path(path).exists():
            return cls()
        res = json.loads(Path(path).read_text())
        lim = res["limits"]
        cal = cls(source=str(path), read_bw_fraction=lim["read_bytes_per_s"] / datasheet_bw,
                  gemm_flops_fraction=lim["gemm_flops_per_s"] / datasheet_flops)
        bw = lim["read_bytes_per_s"]
        rows = [r for r in res.get("attention_shards", []) if r.get("backend") == "sdpa_cudnn" and "time_us" in r]
        if len(rows) >= 2:  # t = bytes / (bw * f) + fixed, least squares
            cal.attn_bw_fraction, cal.attn_fixed_s = _fit_bw(rows, "kv_bytes", bw)
        # decode-sized GEMMs whose weights exceed the L2 cache: the benchmark repeats one GEMM, so smaller
        # weights stay in L2 and would overstate what a step (which streams every layer's weights) gets
        gemm_rows = [r for r in res.get("gemms", []) if r["batch"] <= 256 and r["k"] * r["n"] * 2 >= 64e6]
        if len(gemm_rows) >= 2:
            cal.gemm_bw_fraction, cal.gemm_fixed_s = _fit_bw(gemm_rows, "bytes", bw)
        merges = [r["merge_graph_us"] for r in res.get("merge", []) if "merge_graph_us" in r]
        if merges:
            cal.merge_s = statistics.median(merges) * 1e-6
        steps = [r for r in res.get("decode_steps", []) if r.get("graph") and r.get("backend") == "sdpa_cudnn" and "tpot_ms" in r]
        m = PRESETS[res["model"]]
        if steps:  # what the per-kernel terms leave unexplained in a whole graphed step, per layer
            cal.layer_fixed_s = 0.0  # the residual is taken against a step without the term being fitted
            # the benchmark's steps ran the unfused norms and rotary: the residual over their kernels is a
            # kernel's floor, and the engines now launch the fused count
            cal.kernel_s = _median_residual_per_layer(cal, m, lim, steps, "tpot_ms", eager=False) / \
                SMALL_KERNELS_PER_LAYER["unfused"]
            cal.layer_fixed_s = cal.kernel_s * SMALL_KERNELS_PER_LAYER["fused"]
        flash = [r for r in res.get("attention_shards", []) if r.get("backend") == "sdpa_flash" and "time_us" in r]
        if len(flash) >= 2:
            cal.attn_bw_fraction_eager, cal.attn_fixed_eager_s = _fit_bw(flash, "kv_bytes", bw)
        engine = [r for r in res.get("engine_steps", []) if "engine_step_ms" in r]
        if engine:  # eager engine steps: what the GPU-time terms leave unexplained, per layer
            cal.eager_cpu_s_per_layer = _median_residual_per_layer(cal, m, lim, engine, "engine_step_ms", eager=True)
        return cal


SET_CALIBRATION = {  # the records of the measured multi-GPU set that calibrate FA Pool's host costs (not validation)
    "message_s": "call_c/records/fa_pool_b1_p3_L8192_B140",  # captured steps, eager messages on the critical path
    "eager_unit_s": ("call_a/records/fa_pool_b2_p2_L8192_B16",  # eager steps at a small batch: the host per unit,
                     "call_a/records/fa_pool_b1_p3_L8192_B16"),  # for a base of 2 ranks and of 1
    # FA Pool's prefill copies: one prefill the pool's side decides (one group: base and pool take turns, 2+2) and
    # one its base decides (1+3 in groups: one base rank runs every dense layer)
    "prefill_copies": ("call_l_prefill/records/fa_pool_b2_p2_L32768_B16_prefill",
                       "call_m_prefill/records/fa_pool_b1_p3_pmb2_L32768_B16_prefill"),
}


def record_config(rec) -> BenchConfig:
    return from_dict(rec.config)


def steady_tpot_s(rec) -> float:
    """The median decode step: the steady state (a measured mean also holds the first step after prefill)."""
    return rec.metrics["median_tpot_ms"] / 1e3


def with_limits(cal: Calibration, limits: dict) -> Calibration:
    """cal on the machine and code of a benchmark call: its measured read bandwidth and NCCL times (limits.json),
    and the small kernels per layer its engines launched (`norm_rope`, from the call's kernels.json: "fused"
    unless it says otherwise)."""
    kernels = SMALL_KERNELS_PER_LAYER[limits.get("norm_rope", "fused")]
    return dataclasses.replace(cal, read_bw=limits["read_bytes_per_s"]["used"], comm=limits["comm"],
                               layer_fixed_s=cal.kernel_s * kernels)


def set_calibration(items: dict, base: Calibration | None = None) -> Calibration:
    """A measured set's own calibration, from {record key: (record, its call's limits.json)}; a key is the
    record's folder relative to the set (`call_c/records/fa_pool_b1_p3_L8192_B140`). The limits (harness/
    bench_multi.py) give the read bandwidth and NCCL's time per operation, measured in the same job. The 1-GPU
    reference records give the paged kernel's share of that bandwidth and a floor per layer (least squares of
    step - GEMMs over KV bytes / bandwidth). Two FA Pool records (SET_CALIBRATION) give the host's cost of an
    eager message on the critical path and of an eager unit, two more the rates of FA Pool's prefill copies.
    Every other record validates the model (`check`, `check_prefill`)."""
    cal = dataclasses.replace(base or default_calibration(), source=f"{MEASURED_SET.relative_to(ROOT)} (limits.json, "
                              "reference and calibration records) over the one-GPU benchmark's GEMM terms")
    refs = [(record_config(r), steady_tpot_s(r), lim) for r, lim in items.values() if r.config["strategy"]["kind"] == "reference"]
    used = []
    if refs:  # one unknown, the kernel's bandwidth share (the per-layer floor stays the one-GPU benchmark's):
        xs, ys = [], []  # step - everything else = KV bytes / (bandwidth x share), least squares through 0
        for cfg, meas, lim in refs:
            bare = dataclasses.replace(with_limits(cal, lim), attn_bw_fraction=1e9, attn_fixed_s=0.0)
            kv = sum(mean_context_lengths(cfg)) * 2 * cfg.model.hidden * DTYPE_BYTES[cfg.hardware.dtype]
            xs.append(cfg.model.n_layers * kv / bare.read_bw)
            ys.append(meas - predict_step(cfg, bare)["step_s"])
        cal.attn_bw_fraction = sum(x * x for x in xs) / sum(x * y for x, y in zip(xs, ys))
        cal.attn_fixed_s = 0.0
        used += [key for key, (r, _) in items.items() if r.config["strategy"]["kind"] == "reference"]
    prefilled = [(record_config(r), r.metrics["ttft_ms"] / 1e3, lim) for r, lim in items.values()
                 if r.config["strategy"]["kind"] == "reference" and r.metrics.get("ttft_ms")]
    if prefilled:  # one unknown: the FLOP rate of a prefill on one GPU (no collectives) against the GEMM rate
        whole = dataclasses.replace(cal, prefill_flops_fraction=1.0)
        cal.prefill_flops_fraction = statistics.median(
            predict_step(cfg, with_limits(whole, lim))["prefill_s"] / ttft for cfg, ttft, lim in prefilled)
    by_name = items
    if SET_CALIBRATION["message_s"] in by_name:  # the step's one unknown: 2 messages per unit (one micro-batch, flat)
        rec, lim = by_name[SET_CALIBRATION["message_s"]]
        cfg = record_config(rec)
        units = cfg.model.n_layers * max(1, cfg.strategy.micro_batches)
        cal.message_s = max(0.0, (steady_tpot_s(rec) - predict_step(cfg, with_limits(cal, lim), graphed=True)["step_s"])
                            / (2 * units))
        used.append(SET_CALIBRATION["message_s"])
    cal.eager_unit_s = {}
    for key in SET_CALIBRATION["eager_unit_s"]:  # host-bound: the step is the plan and its units' host time
        if key in by_name:
            cfg = record_config(by_name[key][0])
            units = cfg.model.n_layers * max(1, cfg.strategy.micro_batches)
            cal.eager_unit_s[cfg.strategy.tp] = (steady_tpot_s(by_name[key][0]) - cal.plan_s) / units
            used.append(key)
    cal.calibration_records = tuple(used)
    copies = [by_name[key] for key in SET_CALIBRATION["prefill_copies"] if key in by_name]
    if len(copies) == 2:
        _fit_prefill_copies(cal, *[(record_config(r), r.metrics["ttft_ms"] / 1e3, lim) for r, lim in copies])
        cal.prefill_calibration_records = SET_CALIBRATION["prefill_copies"]
    return cal


def _fit_prefill_copies(cal: Calibration, pool_decided, base_decided, rounds: int = 8) -> None:
    """The two copy rates that make the two records' predicted TTFT their measured one, in turn: the pool's rate
    on the record its pool side decides, the base's on the other (each (cfg, ttft_s, limits)). The predicted TTFT
    falls as a rate rises, so each is a bisection, in log space between 1% and 100x the read bandwidth."""
    def solve(field, cfg, ttft, lim):
        lo, hi = math.log(0.01), math.log(100.0)
        for _ in range(40):
            mid = (lo + hi) / 2
            setattr(cal, field, math.exp(mid))
            lo, hi = (mid, hi) if predict_step(cfg, with_limits(cal, lim))["prefill_s"] > ttft else (lo, mid)
        setattr(cal, field, math.exp((lo + hi) / 2))

    for _ in range(rounds):
        solve("prefill_pool_copy_bw_fraction", *pool_decided)
        solve("prefill_base_copy_bw_fraction", *base_decided)


def measured_items(root: str | Path) -> list:
    """(path, record, its call's limits or None) of every measured GPU record under root."""
    from harness.collect import find_records

    good, _ = find_records(root)
    return [(path, rec, _limits_of(path)) for path, rec in good
            if rec.status == "ok" and rec.env.get("source", "measured") == "measured"
            and rec.config["hardware"]["device"] == "cuda"]  # CPU/gloo runs measure mechanics, not a GPU


@functools.lru_cache(maxsize=None)
def default_calibration() -> Calibration:
    """The committed calibration, fitted once per process: the one-GPU benchmark (GEMMs, merge, eager floors),
    refined by the multi-GPU set (the paged kernel's bandwidth share, NCCL per operation on one node, FA Pool's
    message and eager-unit costs). Projections then take their GPU's own bandwidth (hardware preset x the
    measured fraction of the datasheet) and, on one node, the set's NCCL times (measured on H200 NVLink;
    groups larger than 4 use the 4-GPU figures), across nodes the link model."""
    cal = Calibration.from_bench()
    if not MEASURED_SET.exists():
        return cal
    items = {_key(path, MEASURED_SET): (rec, lim) for path, rec, lim in measured_items(MEASURED_SET) if lim is not None}
    if not items:
        return cal
    cal = set_calibration(items, cal)
    cal.comm = max((lim for _, lim in items.values()), key=lambda lim: lim["read_bytes_per_s"]["used"])["comm"]
    return cal


def _uniform_step_s(cal, m, lim, row, eager):
    """Predicted one-GPU step of a benchmark row: `batch` sequences all at `context` (+ the new token)."""
    return _gpu_step_s(cal, m, row["batch"], [row["context"] + 1] * row["batch"], 1, lim["read_bytes_per_s"],
                       lim["gemm_flops_per_s"], 2, eager)


def _median_residual_per_layer(cal, m, lim, rows, time_key, eager):
    resid = [(r[time_key] * 1e-3 - _uniform_step_s(cal, m, lim, r, eager)) / m.n_layers for r in rows]
    return max(0.0, statistics.median(resid))


def _fit_bw(rows, bytes_key, bw):
    xs = [r[bytes_key] for r in rows]
    ys = [r["time_us"] * 1e-6 for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = max(0.0, my - slope * mx)
    return 1.0 / (slope * bw), fixed


def _gemm_s(cal, rows, k, n, b, bw, flops):
    nbytes = (k * n + rows * (k + n)) * b
    return max(2 * rows * k * n / flops, nbytes / (bw * cal.gemm_bw_fraction)) + cal.gemm_fixed_s


def _attn_s(cal, kv_bytes, bw, eager=False):
    if kv_bytes <= 0:
        return 0.0
    if eager:
        return kv_bytes / (bw * cal.attn_bw_fraction_eager) + cal.attn_fixed_eager_s
    return kv_bytes / (bw * cal.attn_bw_fraction) + cal.attn_fixed_s


def _layer_gemms_s(cal, m, rows, tp, b, bw, flops):
    h, f = m.hidden, m.ffn_hidden
    return (_gemm_s(cal, rows, h, 3 * h // tp, b, bw, flops) + _gemm_s(cal, rows, h // tp, h, b, bw, flops)
            + _gemm_s(cal, rows, h, f // tp, b, bw, flops) + _gemm_s(cal, rows, f // tp, h, b, bw, flops))


def _gpu_step_s(cal, m, rows, ctx, tp, bw, flops, b, eager=False):
    """One GPU's decode step over `rows` sequences of contexts `ctx`, weights split tp ways (no comm)."""
    kv = sum(ctx) * 2 * m.hidden * b // tp
    per_layer = _layer_gemms_s(cal, m, rows, tp, b, bw, flops) + _attn_s(cal, kv, bw, eager) + cal.layer_fixed_s
    head = _gemm_s(cal, rows, m.hidden, m.vocab_size // tp, b, bw, flops)
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


def _collective_s(cal, links, op, group, nbytes, cross_node, graphed=True):
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


def predict_step(cfg: BenchConfig, cal: Calibration | None = None, eager: bool = False, graphed: bool | None = None) -> dict:
    """Predicted decode step: {'step_s', 'phases': {role: {phase: s}}, 'pool_busy_fraction', 'prefill_s'}.

    What the engines do (model/parallel/): static strategies replay each micro-batch's stage pass from a CUDA
    graph (TP collectives inside, at NCCL's in-graph time) and send pipeline messages eagerly; FA Pool replays
    its compute from graphs too (measured with a one-rank base; a larger base runs eagerly in the engine for
    now), its messages always eager. `graphed` overrides that (a record says what ran); `eager` models the engines
    before CUDA graphs and the paged kernel (every step eager, flash attention, phase timers)."""
    cal = cal or default_calibration()
    b, bw, flops, links, gpn = _rates(cfg, cal)
    step, phases, pool_busy = _decode_step(cfg, cal, links, bw, flops, b, mean_context_lengths(cfg), gpn, eager, graphed)
    prefill = predict_prefill(cfg, cal, bw, flops, links, gpn)
    return {"step_s": step, "phases": phases, "pool_busy_fraction": pool_busy, "prefill_s": prefill,
            "calibration": cal.source}


def _rates(cfg: BenchConfig, cal: Calibration):
    """(element bytes, read bandwidth, GEMM FLOP/s, links, GPUs per node) of cfg's hardware under cal."""
    hw = cfg.hardware
    bw = cal.read_bw or (hw.hbm_gbps * 1e9 * cal.read_bw_fraction if hw.hbm_gbps else 2.9e12)
    flops = hw.peak_tflops * 1e12 * cal.gemm_flops_fraction if hw.peak_tflops else 750e12
    links = Links(hw.nvlink_gbps * 1e9 or 300e9, hw.ib_gbps * 1e9 or 25e9)
    return DTYPE_BYTES[hw.dtype], bw, flops, links, (hw.gpus_per_node if hw.gpus_per_node > 1 else 8)


def _decode_step(cfg, cal, links, bw, flops, b, ctx, gpn, eager, graphed):
    if cfg.strategy.kind in ("reference", "static", "dcp"):
        return _static_step(cfg, cal, links, bw, flops, b, ctx, gpn, eager, graphed)
    return _fa_pool_step(cfg, cal, links, bw, flops, b, ctx, gpn, eager, graphed)


def serving_config(cfg: BenchConfig) -> BenchConfig:
    """cfg as the serving engines run it (model/parallel/static.py, fa_pool_serving.py): a pass is one micro-batch
    through the stages in turn, FA Pool's base and pool take turns in a layer and merge flat, one prefill group."""
    s = cfg.strategy
    pool = dataclasses.replace(s.pool, async_overlap=False, wavefront=False, hierarchical=False, prefill_micro_batches=1)
    return dataclasses.replace(cfg, strategy=dataclasses.replace(s, micro_batches=1, schedule="gpipe", pool=pool))


def predict_serving_step(cfg: BenchConfig, cal: Calibration, prefill_start, prefill_len, prefill_pooled, decode_ctx,
                         decode_pooled) -> float:
    """Seconds of one serving step (harness/serving/scheduler.StepPlan): a prefill pass over chunks of
    prefill_len tokens after prefill_start cached ones, then a decode pass over rows attending to decode_ctx
    tokens; the pooled flags say which rows' KV is in FA Pool's pool. cfg: serving_config's. Decode passes replay
    captured graphs where the engine captures them (one stage, not FA Pool); everything else runs eagerly.
    A replay pricing many steps of one config keeps a ServingPricer instead."""
    return ServingPricer(cfg, cal).step(prefill_start, prefill_len, prefill_pooled, decode_ctx, decode_pooled)


class ServingPricer:
    """predict_serving_step for one config (serving_config's) and calibration. A static or DCP decode pass costs
    its row count's GEMMs, collectives and fixed costs (computed once per row count) plus attention over the rows'
    total context."""

    def __init__(self, cfg: BenchConfig, cal: Calibration, table_tokens: int = 0):
        """table_tokens: a row's block table holds this many tokens (the longest context a slot is sized for);
        0: the step's longest row's, rounded up to a block."""
        self.cfg, self.cal, self.table_tokens = cfg, cal, table_tokens
        self.b, self.bw, self.flops, self.links, self.gpn = _rates(cfg, cal)
        s = cfg.strategy
        self.static = s.kind in ("reference", "static", "dcp")
        self.graphed = s.pp == 1 and s.kind != "fa_pool" and s.cuda_graphs
        self.buckets = decode_buckets(cfg.serving.max_batch)
        self._parts: dict[int, _StaticParts] = {}
        self._split_tokens: dict[tuple[int, int], int] = {}  # (rows, table tokens): the kernel's split

    def step(self, prefill_start, prefill_len, prefill_pooled, decode_ctx, decode_pooled) -> float:
        t = 0.0
        if len(decode_ctx):
            t += self.decode_s(decode_ctx, decode_pooled)
        if len(prefill_len):
            t += _prefill_pass_s(self.cfg, self.cal, self.links, self.bw, self.flops, self.b, self.gpn, prefill_start,
                                 prefill_len, prefill_pooled)
        return t

    def decode_s(self, decode_ctx, decode_pooled) -> float:
        """A decode pass over rows attending to decode_ctx tokens (decode_pooled: which are in FA Pool's pool)."""
        cfg, cal, s = self.cfg, self.cal, self.cfg.strategy
        if self.static:
            return self.static_decode_s(len(decode_ctx), int(sum(decode_ctx)), int(max(decode_ctx)))
        lens = [max(1, int(n) - 1) for n in decode_ctx]  # mean_context_lengths adds output_tokens // 2 = 1
        # the scheduler's placement decides; the model's threshold must agree with it
        pool = dataclasses.replace(s.pool, threshold=_threshold_between(decode_ctx, decode_pooled, s.pool.threshold))
        step_cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(s, pool=pool),
                                       workload=dataclasses.replace(cfg.workload, batch_size=len(lens), prompt_lens=lens,
                                                                    buckets=[], output_tokens=2))
        return _decode_step(step_cfg, cal, self.links, self.bw, self.flops, self.b, [int(n) for n in decode_ctx],
                            self.gpn, False, self.graphed)[0]

    def static_decode_s(self, rows: int, ctx_sum: int, ctx_max: int) -> float:
        """A static or DCP decode pass over `rows` rows attending to ctx_sum tokens in all, ctx_max the longest."""
        parts = self._parts.get(rows)
        if parts is None:
            parts = self._parts[rows] = _static_parts(self.cfg, self.cal, self.links, self.bw, self.flops, self.b, rows,
                                                      self.gpn, False, self.graphed)
        return _static_from_parts(self.cfg, self.cal, parts, self.bw, self.b, ctx_sum, False, phases=False,
                                  attn_floor_s=self.longest_program_s(rows, ctx_max),
                                  layer_extra_s=self.cal.serving_layer_s)

    def longest_program_s(self, rows: int, ctx_max: int) -> float:
        """The paged kernel's longest program (model/paged_attention.py): rows x heads x splits programs, the
        splits sized by the block table's width (a captured pass runs its bucket's rows, padding included); the
        longest row's program walks a whole split, or the row if shorter."""
        cfg, bs = self.cfg, self.cfg.serving.block_size
        width = self.table_tokens or -(-ctx_max // bs) * bs
        split_tokens = self._split_tokens.get((rows, width))
        if split_tokens is None:
            n = next((b for b in self.buckets if b >= rows), rows) if self.graphed else rows
            splits = choose_splits(n, cfg.model.n_heads // cfg.strategy.tp, width, cfg.hardware.sm_count)
            split_tokens = self._split_tokens[rows, width] = -(-(-(-width // splits)) // TILE_TOKENS) * TILE_TOKENS
        return min(ctx_max, split_tokens) * self.cal.paged_token_s


def _threshold_between(ctx, pooled, default):
    """A threshold that puts exactly the pooled rows above it (the scheduler's decision, in the model's terms)."""
    ctx, pooled = list(ctx), list(pooled)
    short = [n for n, p in zip(ctx, pooled) if not p]
    return max(short) if short else (min(ctx) - 1 if ctx else default)


def _prefill_pass_s(cfg, cal, links, bw, flops, b, gpn, starts, lens, pooled) -> float:
    """One serving prefill pass: each row's chunk of lens[i] tokens after starts[i] cached ones, as predict_prefill
    prices a chunk, plus what the serving engine adds: every row's earlier keys and values gathered out of its
    blocks into a dense copy per layer (read and written at the copy rate), and the rows padded to the longest
    chunk (the pass's tokens are [rows, longest chunk]: its GEMMs and collectives run on every padded position;
    attention on each row's own)."""
    s, m = cfg.strategy, cfg.model
    h, d = m.hidden, m.head_dim
    flops_p = flops * cal.prefill_flops_fraction
    dense_per_token = 2 * (4 * h * h + 2 * h * m.ffn_hidden)
    starts, lens, pooled = list(starts), list(lens), list(pooled)
    tokens = len(lens) * max(lens)
    before = sum(4 * h * q * a for q, a in zip(lens, starts)) / flops_p
    own = sum(4 * h * q * (q + 1) / 2 for q in lens) / flops_p
    dense = tokens * dense_per_token / flops_p

    def eager(op, group, nbytes, cross):
        return _collective_s(cal, links, op, group, nbytes, cross, graphed=False)

    gathered = sum(a + q for a, q in zip(starts, lens)) * 2 * h * b  # every row's keys and values, all heads
    copy_bw = bw * cal.prefill_base_copy_bw_fraction
    if s.kind == "fa_pool":
        long = [i for i, p in enumerate(pooled) if p]
        short = [i for i, p in enumerate(pooled) if not p]
        tp = s.tp
        layer = 2 * eager("all_reduce", tp, tokens * h * b, tp > gpn)
        layer += dense / tp + sum(4 * h * lens[i] * starts[i] + 2 * h * lens[i] * (lens[i] + 1) for i in short) / flops_p / tp
        layer += 2 * sum((starts[i] + lens[i]) * 2 * h * b for i in short) / tp / copy_bw
        if long:
            lt = sum(lens[i] for i in long)
            l_before = sum(4 * h * lens[i] * starts[i] for i in long) / flops_p
            l_own = sum(2 * h * lens[i] * (lens[i] + 1) for i in long) / flops_p
            start = int(sum(starts[i] for i in long) / len(long))
            # the pool ranks the engine sends to: those holding the rows' blocks (proportional: a rank per
            # tokens_per_rank of the longest row's context), not the whole pool
            p = s.pool
            used = p.size if p.policy != "proportional" else \
                min(p.size, max(-(-(starts[i] + lens[i]) // p.tokens_per_rank) for i in long))
            pool_cfg = dataclasses.replace(cfg, workload=dataclasses.replace(cfg.workload, batch_size=len(long)),
                                           strategy=dataclasses.replace(s, pool=dataclasses.replace(p, size=used)))
            # the pool attends over the chunk too (its keys are stored there first): own goes to the pool
            layer += _fa_pool_prefill_layer_s(pool_cfg, cal, eager, bw, len(long), lt, 0.0, l_before + l_own, 0.0,
                                              max(start, 1), gpn, b) - 2 * eager("all_reduce", tp, lt * h * b, tp > gpn)
        return m.n_layers * layer + 2 * len(lens) * h * m.vocab_size / (flops_p * tp)
    tp, k = s.tp, (s.kv_shards if s.kind == "dcp" else 1)
    cross = tp > gpn
    layer = (dense + before) / tp + own * k / tp + 2 * eager("all_reduce", tp, tokens * h * b, cross)
    layer += 2 * gathered / tp / copy_bw
    if k > 1:
        layer += eager("all_gather", k, 3 * tokens * h // tp * b, cross)
        layer += eager("all_to_all", k, k * tokens * (h // tp) * (d + 1) // d * 4, cross)
    hops = (s.pp - 1) * eager("p2p", 2, tokens * h * b, tp * s.pp > gpn) if s.pp > 1 else 0.0
    return m.n_layers * layer + hops + 2 * len(lens) * h * m.vocab_size / (flops_p * tp)


def _static_step(cfg, cal, links, bw, flops, b, ctx, gpn, eager, graphed=None):
    """Static TP x PP. A micro-batch's pass through a stage: its layers' GEMMs (weights read again for every
    micro-batch), attention over its KV shard, per-layer fixed costs and 2 all-reduces per layer, plus the
    embedding's all-reduce (stage 0) and the LM head with its all-gather (last stage). A step is M passes on
    the busiest stage, and at least one micro-batch's round trip through every stage and back (pp messages):
        continuous: max(M * t_stage, round trip)      gpipe: round trip + (M - 1) * t_stage"""
    parts = _static_parts(cfg, cal, links, bw, flops, b, cfg.workload.batch_size, gpn, eager, graphed)
    return _static_from_parts(cfg, cal, parts, bw, b, sum(ctx), eager)


@dataclass
class _StaticParts:
    """What a static step costs besides attention; it depends on the step's row count alone."""
    layer: float  # a layer's GEMMs, fixed costs, all-reduces and DCP's exchange, per micro-batch
    ar: float  # one all-reduce of the micro-batch's hidden states
    head: float  # LM head and its all-gather
    hop: float  # a pipeline message
    comm: float  # the step's communication (phases)


def _static_parts(cfg, cal, links, bw, flops, b, batch, gpn, eager, graphed=None) -> _StaticParts:
    m, s = cfg.model, cfg.strategy
    tp, pp, M = s.tp, s.pp, max(1, s.micro_batches)
    rows = batch / M
    layers = m.n_layers // pp
    cross = tp > gpn
    graphed = (s.cuda_graphs if graphed is None else graphed) and not eager
    hidden_bytes = rows * m.hidden * b
    ar = _collective_s(cal, links, "all_reduce", tp, hidden_bytes, cross, graphed)
    layer = _layer_gemms_s(cal, m, rows, tp, b, bw, flops) + cal.layer_fixed_s + 2 * ar + _dcp_layer_s(cal, links, s, m, rows, b, cross, graphed)
    head = _gemm_s(cal, rows, m.hidden, m.vocab_size // tp, b, bw, flops) + \
        _collective_s(cal, links, "all_gather", tp, rows * m.vocab_size // tp * 4, cross, graphed)
    hop = _collective_s(cal, links, "p2p", 2, hidden_bytes, tp * pp > gpn, graphed=False) if pp > 1 else 0.0
    comm = M * (layers * (2 * ar + _dcp_layer_s(cal, links, s, m, rows, b, cross, graphed, merge=False)) + ar + (pp > 1) * hop)
    return _StaticParts(layer, ar, head, hop, comm)


def _static_from_parts(cfg, cal, parts: _StaticParts, bw, b, ctx_sum, eager, phases=True, attn_floor_s=0.0,
                       layer_extra_s=0.0):
    """_static_step from its row-count parts and the step's total context (ctx_sum tokens); phases=False: the
    step's seconds alone. attn_floor_s: a layer's attention is no shorter; layer_extra_s: added to each layer."""
    m, s = cfg.model, cfg.strategy
    tp, pp, M = s.tp, s.pp, max(1, s.micro_batches)
    layers = m.n_layers // pp
    attn = max(_attn_s(cal, ctx_sum / M * 2 * m.hidden * b / tp, bw, eager), attn_floor_s) + layer_extra_s
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
    busy = M * t_stage
    ph = dict.fromkeys(PHASES, 0.0)
    comm = parts.comm
    ph.update(attention=M * layers * attn, communication=comm, synchronization=max(0.0, step - busy - eager_s),
              other=max(0.0, busy - M * layers * attn - comm) + eager_s)
    return step, {"reference" if s.kind == "reference" else "stage": ph}, None


def _dcp_layer_s(cal, links, s, m, rows, b, cross, graphed, merge=True) -> float:
    """DCP's extra per layer and micro-batch (model/parallel/dcp.py): the all-gather of this rank's q, k, v in its
    KV-shard group of k, the all-to-all of fp32 partials + LSE (each peer's heads) and the LSE merge. Its attention
    reads the same bytes as TP's (k x the heads, 1/k of the tokens), so that term is TP's."""
    k = s.kv_shards if s.kind == "dcp" else 1
    if k == 1:
        return 0.0
    heads_bytes = rows * m.hidden // s.tp  # this rank's heads x head_dim, per element size
    gather = _collective_s(cal, links, "all_gather", k, heads_bytes * 3 * b, cross, graphed)
    partials = _collective_s(cal, links, "all_to_all", k, heads_bytes * 4 + rows * m.n_heads // s.tp * 4, cross, graphed)
    return gather + partials + (cal.merge_s if merge else 0.0)


def eager_unit_s(cal: Calibration, tp: int) -> float:
    """Host time of an eager FA Pool unit with a base of `tp` ranks (the nearest calibrated degree)."""
    if not cal.eager_unit_s:
        return 0.0
    return cal.eager_unit_s[min(cal.eager_unit_s, key=lambda t: (abs(t - tp), t))]


def _fa_pool_step(cfg, cal, links, bw, flops, b, ctx, gpn, eager, graphed=None):
    """FA Pool. Per layer and micro-batch (a unit) the base computes QKV and its short rows' attention, sends
    q, k, v to the pool (one eager message per pool rank), the pool attends over its share of the pooled KV and
    sends fp32 partials back (a second level first at a node leader when hierarchical), the base merges, projects
    and runs the FFN (2 all-reduces). A unit's critical path is that chain. With async_overlap and M > 1 a
    layer's units overlap: the layer costs the busier side's M units plus one chain's messages; with wavefront
    the next layer's units start while this one finishes, so a layer costs the busier side's M units or one
    micro-batch's whole chain, whichever is longer (not yet checked against a GPU measurement). Eager steps
    (a base of more than one rank) also pay the host's time per unit (cal.eager_unit_s): the host issues every
    kernel and message, so a step cannot be shorter than units x that time."""
    m, s = cfg.model, cfg.strategy
    p = s.pool
    M = max(1, s.micro_batches)
    rows = cfg.workload.batch_size / M
    thr = p.threshold if p.size > 0 else math.inf
    short = [n for n in ctx if n <= thr]
    long = [n for n in ctx if n > thr]
    # projected with captured steps (the design; measured with a one-rank base): the engine still runs a
    # tensor-parallel base eagerly (model/parallel/fa_pool.py says why), which a record's `graphed` states
    graphed = (s.cuda_graphs if graphed is None else graphed) and not eager
    cross_base = s.tp > gpn
    ar = _collective_s(cal, links, "all_reduce", s.tp, rows * m.hidden * b, cross_base, graphed)
    h, f = m.hidden, m.ffn_hidden
    pre = _gemm_s(cal, rows, h, 3 * h // s.tp, b, bw, flops) + \
        _attn_s(cal, sum(short) / M * 2 * h * b / s.tp, bw, eager) + cal.layer_fixed_s / 2
    post = (_gemm_s(cal, rows, h // s.tp, h, b, bw, flops) + _gemm_s(cal, rows, h, f // s.tp, b, bw, flops)
            + _gemm_s(cal, rows, f // s.tp, h, b, bw, flops) + 2 * ar + cal.layer_fixed_s / 2)
    pool_attn = messages = merge = 0.0
    if long:
        pool_attn = _attn_s(cal, sum(long) / M * 2 * h * b / p.size, bw, eager)  # one unit's share
        pool_cross = (s.tp + p.size) > gpn
        q_msg = len(long) / M * 3 * h * b / s.tp / p.size  # q, k, v of its rows from one base rank to one pool rank
        part_msg = len(long) / M * (h * 4 + m.n_heads * 4) / s.tp  # fp32 partials + LSE back to one base rank
        # each hop: its transfer on the device (NCCL's in-graph time for the bytes) and, once, the host's handoff
        # (message_s: the exchange posted and waited on between captured segments). NCCL's eager time is no
        # transfer time: host-bound below a few MB (35-65 us for any size up to 4 MB in limits.json), it would
        # count the host a second time
        messages = (_collective_s(cal, links, "p2p", 2, q_msg, pool_cross, graphed=True)
                    + _collective_s(cal, links, "p2p", 2, part_msg, pool_cross, graphed=True) + 2 * cal.message_s)
        if p.hierarchical and p.size > 1:  # members -> leader first
            messages += _collective_s(cal, links, "p2p", 2, part_msg * s.tp, False, graphed=True) + cal.message_s
        merge = cal.merge_s
    base_unit = pre + post + merge
    if p.async_overlap and p.wavefront and M > 1 and long:
        # a micro-batch's own chain (base unit, messages, pool unit) is the shortest cycle per layer; the M
        # micro-batches in flight keep the base and the pool busy otherwise
        layer = max(M * base_unit, M * pool_attn, base_unit + messages + pool_attn)
    elif p.async_overlap and M > 1 and long:
        layer = max(M * base_unit, M * pool_attn) + messages + min(base_unit, pool_attn)
    else:
        layer = M * (base_unit + messages + pool_attn)
    embed = ar
    head = _gemm_s(cal, cfg.workload.batch_size, h, m.vocab_size // s.tp, b, bw, flops) + \
        _collective_s(cal, links, "all_gather", s.tp, cfg.workload.batch_size * m.vocab_size // s.tp * 4, cross_base, graphed)
    step = m.n_layers * layer + embed + head
    # the host: resource management and the plan every step (overlapping the GPU's work), and when eager every
    # kernel and message of every unit: a step is never shorter than that
    host = cal.plan_s + (0.0 if graphed else m.n_layers * M * eager_unit_s(cal, s.tp))
    step = max(step, host)
    ph = dict.fromkeys(PHASES, 0.0)
    base_busy = m.n_layers * M * base_unit + embed + head
    ph.update(attention=m.n_layers * M * (pre - _gemm_s(cal, rows, h, 3 * h // s.tp, b, bw, flops)),
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


def predict_prefill(cfg, cal, bw, flops, links, gpn: int) -> float:
    """Prefill, chunk by chunk as the engines run it (strategy.prefill_chunk; whole prompts when 0). Per chunk and
    layer: GEMM and attention FLOPs at the GEMM efficiency (attention over the keys before the chunk, and causal
    over the chunk itself), plus each strategy's collectives and messages at NCCL's eager time:
    - static TP x PP: 2 all-reduces of the chunk's activations per layer; the stages overlap over chunks x
      micro-batches, so the busiest stage's work plus a pipeline fill;
    - DCP: the group's q, k, v all-gathered and the fp32 partials exchanged (all-to-all) per layer; the shard
      that takes the chunk's own keys is the busiest;
    - FA Pool: the base runs every dense layer (tp ranks) and the chunk's causal attention; each pool rank gets the
      long rows' queries and its share of the chunk's K/V, attends over its share of the keys before the chunk,
      and sends fp32 partials back. One prefill group: base and pool take turns each layer (the pool's attention
      overlaps only the base's own causal part); several (strategy.pool.prefill_micro_batches): a layer costs the
      busier side, plus one group's turn of the other side at each end of a chunk; both sides' copies at their
      calibrated rates.
    The LM head runs once, on each prompt's last position."""
    m, s, w = cfg.model, cfg.strategy, cfg.workload
    b = DTYPE_BYTES[cfg.hardware.dtype]
    h, layers, d = m.hidden, m.n_layers, m.head_dim
    lens = prompt_lengths(w)
    chunk = s.prefill_chunk or max(lens)
    flops = flops * cal.prefill_flops_fraction
    dense_per_token = 2 * (4 * h * h + 2 * h * m.ffn_hidden)  # one layer's GEMM FLOPs per token

    def eager(op, group, nbytes, cross):
        return _collective_s(cal, links, op, group, nbytes, cross, graphed=False)

    per_layer = []  # (seconds of one layer of this chunk on the critical path)
    for start in range(0, max(lens), chunk):
        new = [min(chunk, max(0, n - start)) for n in lens]
        tokens = sum(new)
        before = sum(4 * h * q * start for q in new) / flops  # whole model, all heads: split below
        own = sum(4 * h * q * (q + 1) / 2 for q in new) / flops
        dense = tokens * dense_per_token / flops
        if s.kind == "fa_pool":
            rows = sum(1 for q in new if q)  # rows with tokens in this chunk: their keys before it are gathered
            per_layer.append(_fa_pool_prefill_layer_s(cfg, cal, eager, bw, rows, tokens, dense, before, own, start,
                                                      gpn, b))
            continue
        tp, k = s.tp, (s.kv_shards if s.kind == "dcp" else 1)
        cross = tp > gpn
        layer = (dense + before) / tp + own * k / tp + 2 * eager("all_reduce", tp, tokens * h * b, cross)
        if k > 1:  # the group's q, k, v gathered; fp32 partials (and LSE) of the group's heads exchanged
            layer += eager("all_gather", k, 3 * tokens * h // tp * b, cross)
            layer += eager("all_to_all", k, k * tokens * (h // tp) * (d + 1) // d * 4, cross)
        per_layer.append(layer)
    head = 2 * len(lens) * h * m.vocab_size / (flops * s.tp)
    if s.kind == "fa_pool" or s.pp == 1:
        return layers * sum(per_layer) + head
    units = len(per_layer) * max(1, s.micro_batches)  # what flows through the stages
    stage = layers // s.pp * sum(per_layer)
    return stage * (1 + (s.pp - 1) / units) + head


def _fa_pool_prefill_layer_s(cfg, cal, eager, bw, rows, tokens, dense, before, own, start, gpn, b) -> float:
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


# ----------------------------------------------------------------------------------------------------------
# Projected records (launcher=model) and the predicted-vs-measured check.
# ----------------------------------------------------------------------------------------------------------
def project(cfg: BenchConfig, cfg_dict: dict, eager: bool = False):
    """A record of status ok (or oom when it cannot fit) marked env.source = 'projected'. Nothing runs."""
    from harness.measure import breakdown, compute_metrics
    from harness.record import RunRecord, run_id

    env = {"source": "projected", "hardware": cfg.hardware.name, "world_size": cfg.strategy.world_size,
           "device": cfg.hardware.device, "model": "harness/perfmodel.py"}
    too_big = check_fits(cfg)
    if too_big:
        return RunRecord(run_id=run_id(cfg_dict), status="oom", config=cfg_dict, error=f"projected: {too_big}", env=env)
    cal = default_calibration()
    pred = predict_step(cfg, cal, eager)
    env["calibration"] = cal.source
    w = cfg.workload
    lens = prompt_lengths(w)
    ttft = pred["prefill_s"]  # projected: the prefill is predicted even where a measured run would skip it
    steps = [pred["step_s"]] * (w.output_tokens - 1)
    metrics = compute_metrics(ttft, steps, sum(lens), w.batch_size, cfg.strategy.world_size)
    metrics["prefill_s_projected"] = pred["prefill_s"]
    memory = {r.role: {"peak_bytes_max": r.total_bytes, "weight_bytes_max": r.weight_bytes, "kv_bytes_max": r.kv_bytes,
                       "source": "projected: weights + KV + activations + 1 GiB workspace"} for r in memory_by_role(cfg)}
    util = {}
    if pred["pool_busy_fraction"] is not None:
        util = {f"rank{cfg.strategy.tp + i}": pred["pool_busy_fraction"] for i in range(cfg.strategy.pool.size)}
    return RunRecord(run_id=run_id(cfg_dict), status="ok", config=cfg_dict, env=env, metrics=metrics,
                     step_times_ms=[t * 1e3 for t in steps], memory=memory,
                     breakdown={role: breakdown(ph) for role, ph in pred["phases"].items()},
                     pool_utilization=util, synthetic_kv=False)


def _call_file(path: Path, name: str):
    """The JSON file `name` of the benchmark call a record belongs to (in a folder above it), or None."""
    for folder in Path(path).resolve().parents:
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    return None


def _limits_of(path: Path) -> dict | None:
    """The limits.json of the benchmark call a record belongs to, if any, with the call's kernels.json (what its
    engines launched, e.g. {"norm_rope": "unfused"}) merged in."""
    limits = _call_file(path, "limits.json")
    if limits is not None:
        limits = {**limits, **{k: v for k, v in (_call_file(path, "kernels.json") or {}).items() if k != "why"}}
    return limits


def _invalid_of(path: Path) -> dict:
    """What a call folder above a record says its records do not measure (invalid.json: {"decode": "why"}), if any:
    e.g. decode steps that ran a bug found later, whose prefill still stands."""
    return _call_file(path, "invalid.json") or {}


def _key(path: Path, root) -> str:
    """A record's folder relative to the set: `call_c/records/fa_pool_b1_p3_L8192_B140`."""
    folder = Path(path).resolve().parent
    try:
        return folder.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return folder.name


def _calibrated_items(root) -> tuple[list, Calibration | None]:
    """The measured GPU records under root, and the calibration of their set (from the records of benchmark calls,
    those with a limits.json; None without any)."""
    items = measured_items(root)
    keyed = {_key(path, root): (rec, lim) for path, rec, lim in items if lim is not None}
    return items, set_calibration(keyed, Calibration.from_bench()) if keyed else None


def check(root: str | Path, calibrated: tuple | None = None) -> list[dict]:
    """Predicted vs measured TPOT for every measured GPU record under root. Records of a multi-GPU benchmark
    call (a limits.json above them) are predicted with their set's calibration (`set_calibration`) against the
    median step; older records (no limits.json: eager engines) with the default calibration, eagerly, against
    the mean. Rows of calibration records say so and stay out of the error statistics (`summarize`).
    calibrated: `_calibrated_items(root)` when the caller has it already."""
    items, cal_set = calibrated or _calibrated_items(root)
    rows = []
    for path, rec, lim in items:
        if "decode" in _invalid_of(path):
            continue
        cfg = record_config(rec)
        name = _key(path, root)
        if lim is None:
            pred, meas, basis = predict_step(cfg, eager=True)["step_s"] * 1e3, rec.metrics["mean_tpot_ms"], "mean (eager engine)"
        else:
            graphed = all(r.get("cuda_graphs", False) for r in rec.ranks)  # what ran (older records do not say: eager)
            pred = predict_step(cfg, with_limits(cal_set, lim), graphed=graphed)["step_s"] * 1e3
            meas, basis = rec.metrics["median_tpot_ms"], "median" + ("" if graphed else ", eager steps")
        rows.append({"record": name, "strategy": cfg.strategy.name, "workload": cfg.workload.name,
                     "batch": cfg.workload.batch_size, "measured_ms": meas, "measured_mean_ms": rec.metrics["mean_tpot_ms"],
                     "predicted_ms": pred, "rel_error": (pred - meas) / meas, "basis": basis,
                     "calibration": bool(cal_set) and name in cal_set.calibration_records})
    return rows


def check_prefill(root: str | Path, calibrated: tuple | None = None) -> list[dict]:
    """Predicted vs measured TTFT of every measured record under root with a real prefill, each with its set's
    calibration (as `check`); the one-GPU reference records calibrate the prefill's FLOP rate, two FA Pool records
    its copy rates (not validation)."""
    items, cal_set = calibrated or _calibrated_items(root)
    rows = []
    for path, rec, lim in items:
        if lim is None or not rec.metrics.get("ttft_ms"):
            continue
        cfg = record_config(rec)
        pred = predict_step(cfg, with_limits(cal_set, lim))["prefill_s"] * 1e3
        meas = rec.metrics["ttft_ms"]
        name = _key(path, root)
        rows.append({"record": name, "strategy": cfg.strategy.name, "measured_ms": meas, "predicted_ms": pred,
                     "rel_error": (pred - meas) / meas, "basis": "ttft",
                     "calibration": cfg.strategy.kind == "reference" or name in cal_set.prefill_calibration_records})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per strategy over the validation rows (calibration rows left out): count, median and max |rel. error|."""
    out = []
    group = lambda r: r["strategy"] + (" (eager steps)" if "eager" in r["basis"] else "")  # noqa: E731
    for name in sorted({group(r) for r in rows}):
        errs = [abs(r["rel_error"]) for r in rows if group(r) == name and not r["calibration"]]
        if errs:
            out.append({"strategy": name, "records": len(errs), "median_abs_error": statistics.median(errs),
                        "max_abs_error": max(errs)})
    return out


def check_graphed(bench_json: Path = CALIBRATION_SET) -> list[dict]:
    """Predicted vs measured TPOT of the graphed single-GPU steps in the benchmark's own result set."""
    res = json.loads(Path(bench_json).read_text())
    cal = Calibration.from_bench(bench_json)
    lim = res["limits"]
    m = PRESETS[res["model"]]
    rows = []
    for r in res.get("decode_steps", []):
        if not r.get("graph") or r.get("backend") != "sdpa_cudnn" or "tpot_ms" not in r:
            continue
        pred = _uniform_step_s(cal, m, lim, r, eager=False) * 1e3
        rows.append({"record": f"graphed L={r['context']} B={r['batch']}", "measured_ms": r["tpot_ms"],
                     "predicted_ms": pred, "rel_error": (pred - r["tpot_ms"]) / r["tpot_ms"]})
    return rows


def why_no_rows(root: str | Path) -> str:
    """One line: why `check` finds nothing under root (it checks only ok GPU measurements, the model's subject)."""
    from harness.collect import find_records

    good, bad = find_records(root)
    kinds = {"ran on CPU (mechanics, not GPU time)": 0, "projected": 0, "not ok": 0, "ok GPU records marked invalid": 0}
    for path, rec in good:
        if rec.status != "ok":
            kinds["not ok"] += 1
        elif rec.env.get("source", "measured") != "measured":
            kinds["projected"] += 1
        elif rec.config["hardware"]["device"] != "cuda":
            kinds["ran on CPU (mechanics, not GPU time)"] += 1
        else:
            kinds["ok GPU records marked invalid"] += 1
    found = ", ".join(f"{n} {k}" for k, n in kinds.items() if n) + (f", {len(bad)} unreadable" if bad else "")
    return (f"(empty: the model predicts GPU steps and {root} holds no ok measured GPU record to check it against; "
            f"{len(good) + len(bad)} result.json found{': ' + found if found else ''})")


def check_table(root: str | Path) -> str:
    """`check` and `summarize` as markdown, then `check_prefill`'s; the set calibrated once for both."""
    calibrated = _calibrated_items(root)
    rows, prefill = check(root, calibrated), check_prefill(root, calibrated)
    if not rows and not prefill:
        return why_no_rows(root)
    lines = ["| record | strategy | measured TPOT ms (basis) | predicted ms | rel. error | |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["strategy"], r["record"])):
        lines.append(f"| {r['record']} | {r['strategy']} | {r['measured_ms']:.2f} ({r['basis']}) | {r['predicted_ms']:.2f} | "
                     f"{r['rel_error']:+.1%} | {'calibration' if r['calibration'] else ''} |")
    lines += ["", "Per strategy, calibration records left out:", "",
              "| strategy | records | median abs. error | max abs. error |", "|---|---|---|---|"]
    lines += [f"| {x['strategy']} | {x['records']} | {x['median_abs_error']:.1%} | {x['max_abs_error']:.1%} |"
              for x in summarize(rows)]
    if prefill:
        lines += ["", "Prefill: TTFT of the records with a real prefill (the reference's calibrate the prefill's FLOP "
                  "rate, two FA Pool records its copy rates):", "", "| record | strategy | measured TTFT ms | predicted ms | rel. error | |", "|---|---|---|---|---|---|"]
        for r in sorted(prefill, key=lambda r: (r["strategy"], r["record"])):
            lines.append(f"| {r['record']} | {r['strategy']} | {r['measured_ms']:.0f} | {r['predicted_ms']:.0f} | "
                         f"{r['rel_error']:+.1%} | {'calibration' if r['calibration'] else ''} |")
        lines += ["", "| strategy | records | median abs. error | max abs. error |", "|---|---|---|---|"]
        lines += [f"| {x['strategy']} | {x['records']} | {x['median_abs_error']:.1%} | {x['max_abs_error']:.1%} |"
                  for x in summarize(prefill)]
    return "\n".join(lines)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="predicted vs measured TPOT for the measured records under a directory")
    ap.add_argument("root", nargs="?", default=str(MEASURED_SET))
    ap.add_argument("--serving", action="store_true",
                    help="trace replays: each measured replay under root against its replay in virtual time")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        raise SystemExit(f"fapool-perfmodel: {args.root} is not a directory of records")
    if args.serving:
        from harness.serving.virtual import check_serving

        table = check_serving(args.root)
        print("(no measured trace replays found)" if table.empty else table.to_markdown(index=False, floatfmt=".3g"))
        return
    print(f"calibration: {default_calibration().source}")
    print(check_table(args.root))
    if CALIBRATION_SET.exists():
        rows = check_graphed()
        print("\n## graphed one-GPU steps of the benchmark (its own calibration set, not a validation)")
        for r in rows:
            print(f"| {r['record']} | {r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | {r['rel_error']:+.1%} |")


if __name__ == "__main__":
    main()
