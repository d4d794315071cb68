"""The performance model's calibration: fractions of a GPU's datasheet limits and fixed costs, fitted on the
committed one-GPU benchmark and refined by a measured multi-GPU set (its read bandwidth and NCCL times measured in
the same job, and the records that calibrate rather than validate)."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from harness.config import BenchConfig, from_dict
from harness.costs import gpu_step_s
from harness.memory import DTYPE_BYTES, mean_context_lengths
from harness.perfmodel import predict_step
from model.config import PRESETS

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION_SET = ROOT / "results" / "measured" / "h100-x1" / "bench_gpu.json"  # one GPU: GEMMs, merge, floors
MEASURED_SET = ROOT / "results" / "measured" / "h200-x4" / "bench"  # 4 GPUs: paged kernel, NCCL, FA Pool host costs
SERVING_DECODE_SET = ROOT / "results" / "measured" / "h200-x1" / "serve"  # one GPU: serving decode steps (Calibration)
SERVING_HOST_SET = ROOT / "results" / "measured" / "h100-x1" / "serve_ragged"  # one GPU: eager serving passes
# one GPU: a closed loop's decode steps taken apart by the profiler (the ragged plan's build)
RAGGED_PLAN_SET = ROOT / "results" / "measured" / "h100-x1" / "serve_profile" / "closed256"
# one GPU: the ragged plan's build alone (a program per tile) on 16-256 short rows (harness/bench_paged.py --short-rows)
RAGGED_PLAN_BUILD_SET = ROOT / "results" / "measured" / "h100-x1" / "serve_pass_plan" / "short_rows"
# one GPU: a replay's sampled mixed steps with their prefill passes taken apart by the profiler
SERVING_PREFILL_SET = ROOT / "results" / "measured" / "h100-x1" / "serve_pass_plan" / "rate8_profile"
# Small kernels a decode layer launches besides its GEMMs and attention (model/transformer.py), by how the engine
# runs RMSNorm and rotary: "unfused" (engines without the fused kernels, and the one-GPU benchmark that fits
# the floor per kernel): each norm in 8 torch ops (cast, square, mean, add, rsqrt, scale, cast, weight) and rotary per q and k in
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
    # prefill records (SET_CALIBRATION), 1.0 (the bandwidth itself, a lower bound) without them. The pool's rate
    # also prices DCP's copies around its prefill exchange (costs.prefill_copy_s): the same kinds of kernels
    prefill_pool_copy_bw_fraction: float = 1.0
    prefill_base_copy_bw_fraction: float = 1.0
    prefill_calibration_records: tuple = ()  # records the prefill's copy rates were fitted on (not validation)
    # A serving decode pass (harness/perfmodel.ServingPricer), fitted on the decode steps of a measured serving set
    # (SERVING_DECODE_SET; harness/serving/virtual.fit_serving_decode):
    # - paged_token_s: one program of the paged kernel walks its split of a row at this time per token (a head's K
    #   and V: 512 bytes in bf16); the kernel sizes its splits by the block table's width, not the rows' lengths,
    #   so a few rows' attention takes the longest program's walk however little KV they hold in all
    # - serving_layer_s: per layer, what the pass spends beyond the kernels counted (small-batch GEMMs below the
    #   calibrated streaming rate, the split merge, the table's reads); not broken down: no profile of it yet
    paged_token_s: float = 39.6e-9
    serving_layer_s: float = 56.9e-6
    # The ragged plan's build by one program comparing its tiles in turn (the engines before a program per tile:
    # records with decode_plan_build "layer" or "pass"), per tile of items x rows
    # (plan_kernel_tiles): the profiler's time of the kernel in a replay's sampled decode steps (RAGGED_PLAN_SET;
    # harness/serving/virtual.fit_ragged_plan_tile); the profile lists the kernel where it weighs, at many rows
    # (at fewer rows a build is not proportional to its tiles: the set's README has the figures)
    ragged_plan_tile_s: float = 6.33e-6
    # The build as the serving engines run it, a program per tile side by side (PLAN_BUILD "pass_tiles"): one
    # build, whatever the rows; the median of its time alone on 16-256 rows (RAGGED_PLAN_BUILD_SET;
    # harness/serving/virtual.fit_ragged_plan_build)
    ragged_plan_pass_s: float = 13.2e-6
    # A serving prefill pass's device work, from its kernels (SERVING_PREFILL_SET: the profiler's time by kind over
    # the sampled passes; harness/serving/virtual.fit_serving_prefill_parts). Its GEMMs run at the GEMM rate,
    # padding included (the profile's GEMM time is the model's at that rate); then
    # - serving_prefill_attn_flops_fraction: its fused attention (each row's chunk over its cached keys and over
    #   itself) at this fraction of the GEMM rate
    # - serving_gather_bw_fraction: a row's cached keys and values gathered out of their blocks, then laid out
    #   heads-major (two copies, model/parallel/paged_kv.PagedKV.dense), at this fraction of the read bandwidth,
    #   counting each copy's read and write
    # - serving_prefill_elementwise_passes: the rest of a layer (norms, rotary, activation, residuals, cache
    #   writes) as this many reads or writes of the pass's padded activations [tokens, hidden] at the bandwidth
    serving_prefill_attn_flops_fraction: float = 0.451
    serving_gather_bw_fraction: float = 0.648
    serving_prefill_elementwise_passes: float = 63.8
    # A serving prefill pass runs eagerly: the host launches its kernels one by one, so a pass is no shorter than
    # the host's time to launch them, per layer this (fitted on the host-bound prefill passes of a measured
    # serving set, SERVING_HOST_SET: harness/serving/virtual.fit_serving_prefill_host)
    serving_prefill_host_layer_s: float = 1.974e-3
    # A prefill pass through one mask (a static engine's of more rows than model/parallel/serving_kv.ROWS_ONE_BY_ONE
    # or from a bucket graph, every DCP and FA Pool pass): the mem-efficient kernel with an additive bias computes
    # every query of every row against every key the mask spans, at this fraction of the GEMM rate (fitted on one
    # such step of SERVING_HOST_SET: harness/serving/virtual.fit_masked_attention)
    masked_attn_flops_fraction: float = 0.178

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
    # captured steps, eager messages on the critical path: at the smallest batch, where the messages weigh most in
    # the step (at a large batch the pool's attention is most of it, and a few percent of its time would be taken
    # for host time)
    "message_s": "call_h/records/fa_pool_b1_p3_L8192_B16",
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
    record's folder relative to the set (`<call>/records/<record>`). The limits (harness/
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
        bare = dataclasses.replace(with_limits(cal, lim), message_s=0.0)
        cal.message_s = max(0.0, (steady_tpot_s(rec) - predict_step(cfg, bare, graphed=True)["step_s"]) / (2 * units))
        used.append(SET_CALIBRATION["message_s"])
    if any(key in by_name for key in SET_CALIBRATION["eager_unit_s"]):
        cal.eager_unit_s = {}
    for key in SET_CALIBRATION["eager_unit_s"]:  # host-bound: the step is the plan and its units' host time
        if key in by_name:
            cfg = record_config(by_name[key][0])
            units = cfg.model.n_layers * max(1, cfg.strategy.micro_batches)
            cal.eager_unit_s[cfg.strategy.tp] = (steady_tpot_s(by_name[key][0]) - cal.plan_s) / units
            used.append(key)
    cal.calibration_records = tuple(used)
    copies = [by_name[key] for key in SET_CALIBRATION["prefill_copies"] if key in by_name]
    cal.prefill_calibration_records = ()
    if len(copies) == 2:  # fitted from the read bandwidth up, whatever rates the base brought
        cal.prefill_pool_copy_bw_fraction = cal.prefill_base_copy_bw_fraction = 1.0
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
    """(path, record, its call's limits or None) of every measured static-batch GPU record under root."""
    from harness.collect import find_records

    good, _ = find_records(root)
    return [(path, rec, limits_of(path)) for path, rec in good
            if rec.status == "ok" and rec.env.get("source", "measured") == "measured"
            and rec.config["hardware"]["device"] == "cuda"  # CPU/gloo runs measure mechanics, not a GPU
            and rec.config["workload"].get("kind", "batch") == "batch"]  # trace replays: `fapool-perfmodel --serving`


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
    items = {record_key(path, MEASURED_SET): (rec, lim) for path, rec, lim in measured_items(MEASURED_SET) if lim is not None}
    if not items:
        return cal
    cal = set_calibration(items, cal)
    cal.comm = max((lim for _, lim in items.values()), key=lambda lim: lim["read_bytes_per_s"]["used"])["comm"]
    return cal


def uniform_step_s(cal, m, lim, row, eager):
    """Predicted one-GPU step of a benchmark row: `batch` sequences all at `context` (+ the new token)."""
    return gpu_step_s(cal, m, row["batch"], [row["context"] + 1] * row["batch"], 1, lim["read_bytes_per_s"],
                       lim["gemm_flops_per_s"], 2, eager)


def _median_residual_per_layer(cal, m, lim, rows, time_key, eager):
    resid = [(r[time_key] * 1e-3 - uniform_step_s(cal, m, lim, r, eager)) / m.n_layers for r in rows]
    return max(0.0, statistics.median(resid))


def _fit_bw(rows, bytes_key, bw):
    xs = [r[bytes_key] for r in rows]
    ys = [r["time_us"] * 1e-6 for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = max(0.0, my - slope * mx)
    return 1.0 / (slope * bw), fixed


def call_file(path: Path, name: str):
    """The JSON file `name` of the benchmark call a record belongs to (in a folder above it), or None."""
    for folder in Path(path).resolve().parents:
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    return None


def limits_of(path: Path) -> dict | None:
    """The limits.json of the benchmark call a record belongs to, if any, with the call's kernels.json (what its
    engines launched, e.g. {"norm_rope": "unfused"}) merged in."""
    limits = call_file(path, "limits.json")
    if limits is not None:
        limits = {**limits, **{k: v for k, v in (call_file(path, "kernels.json") or {}).items() if k != "why"}}
    return limits


def invalid_of(path: Path) -> dict:
    """What a call folder above a record says its records do not measure (invalid.json: {"decode": "why"}), if any:
    e.g. decode steps that ran a bug found later, whose prefill still stands."""
    return call_file(path, "invalid.json") or {}


def record_key(path: Path, root) -> str:
    """A record's folder relative to the set: `<call>/records/<record>`."""
    folder = Path(path).resolve().parent
    try:
        return folder.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return folder.name
