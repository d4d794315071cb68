"""The performance model: memory per GPU role (this file's first half) and time per decode step (second half)
for any (model, strategy, workload, hardware), from shapes, bytes and FLOPs. Assumptions are in the README.

Memory is what decides feasibility before anything is launched: weights, KV cache, activations and a
fixed workspace per rank, by role (`reference`, `stage<i>`, `base`, `pool`).
"""
from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from harness.config import BenchConfig
from harness.measure import PHASES
from harness.workload import prompt_lengths
from model.config import PRESETS, ModelConfig

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
    if s.kind == "reference":
        return [RoleMemory("reference", 1, m.param_count() * b, sum(ctx) * kv_token * m.n_layers,
                           _activations(m, cfg.workload.batch_size, 1, b))]
    if s.kind == "static":
        layers = m.n_layers // s.pp
        roles = []
        for stage in range(s.pp):
            w = layers * layer_params(m) * b // s.tp + (embed // s.tp if stage == 0 else 0) \
                + (embed // s.tp + m.hidden * b if stage == s.pp - 1 else 0)
            roles.append(RoleMemory(f"stage{stage}", s.tp, w, sum(ctx) * kv_token * layers // s.tp,
                                    _activations(m, rows, s.tp, b)))
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


# ----------------------------------------------------------------------------------------------------------
# Time: a decode step (and prefill) per phase, from bytes and FLOPs against calibrated efficiencies.
# ----------------------------------------------------------------------------------------------------------
CALIBRATION_SET = Path(__file__).resolve().parent.parent / "results" / "measured" / "h100-x1" / "bench_gpu.json"
LINK_LATENCY_S = {"nvlink": 5e-6, "ib": 10e-6}  # per message (assumed; NCCL small-message latency order)


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
    layer_fixed_s: float = 20e-6  # norms, rotary, residuals, cache writes per layer (graphed)
    eager_cpu_s_per_layer: float = 0.0  # Python/launch time per layer when not graphed (eager engines)
    merge_s: float = 36e-6  # LSE merge of one micro-batch's partials (graphed)

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
            cal.layer_fixed_s = _median_residual_per_layer(cal, m, lim, steps, "tpot_ms", eager=False)
        flash = [r for r in res.get("attention_shards", []) if r.get("backend") == "sdpa_flash" and "time_us" in r]
        if len(flash) >= 2:
            cal.attn_bw_fraction_eager, cal.attn_fixed_eager_s = _fit_bw(flash, "kv_bytes", bw)
        engine = [r for r in res.get("engine_steps", []) if "engine_step_ms" in r]
        if engine:  # eager engine steps: what the GPU-time terms leave unexplained, per layer
            cal.eager_cpu_s_per_layer = _median_residual_per_layer(cal, m, lim, engine, "engine_step_ms", eager=True)
        return cal


@functools.lru_cache(maxsize=None)
def default_calibration() -> Calibration:
    """The committed set's calibration, read and fitted once per process."""
    return Calibration.from_bench()


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


def predict_step(cfg: BenchConfig, cal: Calibration | None = None, eager: bool = False) -> dict:
    """Predicted decode step: {'step_s', 'phases': {role: {phase: s}}, 'pool_busy_fraction', 'prefill_s'}."""
    cal = cal or default_calibration()
    m, s, w, hw = cfg.model, cfg.strategy, cfg.workload, cfg.hardware
    b = DTYPE_BYTES[hw.dtype]
    bw = hw.hbm_gbps * 1e9 * cal.read_bw_fraction if hw.hbm_gbps else 2.9e12
    flops = hw.peak_tflops * 1e12 * cal.gemm_flops_fraction if hw.peak_tflops else 750e12
    links = Links(hw.nvlink_gbps * 1e9 or 300e9, hw.ib_gbps * 1e9 or 25e9)
    ctx = [n + w.output_tokens // 2 for n in prompt_lengths(w)]  # mean context over the run
    B, M = w.batch_size, max(1, s.micro_batches)
    gpn = hw.gpus_per_node or 8
    eager_s = cal.eager_cpu_s_per_layer * m.n_layers if eager else 0.0
    act = lambda rows: rows * m.hidden * b  # noqa: E731  one hidden state per row
    phases, pool_busy = {}, None

    def gemm_part(rows, tp):
        return m.n_layers * (_layer_gemms_s(cal, m, rows, tp, b, bw, flops) + cal.layer_fixed_s) + \
            _gemm_s(cal, rows, m.hidden, m.vocab_size // tp, b, bw, flops)

    if s.kind in ("reference", "static"):
        tp, pp = s.tp, s.pp
        mb = math.ceil(B / M)
        layers = m.n_layers // pp
        cross = tp > gpn
        # one micro-batch on one stage
        st_other = layers / m.n_layers * gemm_part(mb, tp)
        st_attn = layers * _attn_s(cal, sum(ctx) / M * 2 * m.hidden * b / tp, bw, eager)
        st_comm = layers * 2 * links.allreduce_s(act(mb), tp, cross) + links.allreduce_s(act(mb), tp, cross)
        stage = st_other + st_attn + st_comm
        p2p = links.send_s(act(mb), cross_node=tp * 1 >= gpn) if pp > 1 else 0.0
        slots = M + pp - 1  # GPipe forward: fill, steady state, drain
        step = slots * (stage + p2p) + eager_s
        busy = M * stage
        ph = dict.fromkeys(PHASES, 0.0)
        ph.update(attention=M * st_attn, communication=M * (st_comm + p2p),
                  synchronization=step - busy - M * p2p - eager_s, other=M * st_other + eager_s)
        phases["reference" if s.kind == "reference" else "stage"] = ph
    else:
        p = s.pool
        thr = p.threshold if p.size > 0 else math.inf
        short = [n for n in ctx if n <= thr]
        long = [n for n in ctx if n > thr]
        cross_base = s.tp > gpn
        other = gemm_part(B, s.tp)
        base_attn = m.n_layers * _attn_s(cal, sum(short) * 2 * m.hidden * b / s.tp, bw, eager)
        base_comm = m.n_layers * 2 * links.allreduce_s(act(B), s.tp, cross_base) + links.allreduce_s(act(B), s.tp, cross_base)
        pool_attn = pool_comm = merge = 0.0
        if long:
            ranks = [max(1, min(p.max_size, p.size, math.ceil(n / p.tokens_per_rank))) if p.policy == "proportional"
                     else min(p.max_size, p.size) for n in long]
            # blocks spread round-robin: each pool rank streams its share of the long KV
            per_rank_kv = sum(n * 2 * m.hidden * b for n in long) / p.size
            pool_attn = m.n_layers * _attn_s(cal, per_rank_kv, bw, eager)
            nodes_per_seq = [math.ceil(r / gpn) for r in ranks]
            sources = nodes_per_seq if p.hierarchical else ranks
            q_bytes = len(long) * m.hidden * b  # q of every long sequence, to each of its ranks
            part_bytes = sum(src * (m.hidden * b + m.n_heads * 4) for src in sources)
            intra = sum(max(0, r - nn) * (m.hidden * b + m.n_heads * 4) for r, nn in zip(ranks, nodes_per_seq)) \
                if p.hierarchical else 0.0
            pool_cross = (s.tp + p.size) > gpn
            per_layer_comm = (links.send_s(q_bytes * max(ranks) / s.tp, pool_cross)
                              + links.send_s(part_bytes / s.tp, pool_cross)
                              + (links.send_s(intra / p.size, False) if intra else 0.0))
            pool_comm = m.n_layers * per_layer_comm
            merge = m.n_layers * M * cal.merge_s
        base_busy = other + base_attn + base_comm + merge
        pool_path = pool_attn + pool_comm
        if p.async_overlap and M > 1 and long:  # pool work of one micro-batch hides behind base work of others
            step = max(base_busy, pool_path) + min(base_busy, pool_path) / M
        else:
            step = base_busy + pool_path
        step += eager_s
        ph = dict.fromkeys(PHASES, 0.0)
        ph.update(attention=base_attn, communication=base_comm + merge + (pool_comm if long else 0.0),
                  synchronization=max(0.0, step - base_busy - (pool_comm if long else 0.0) - eager_s),
                  other=other + eager_s)
        phases["base"] = ph
        if p.size:
            pph = dict.fromkeys(PHASES, 0.0)
            pph.update(attention=pool_attn, communication=pool_comm, synchronization=max(0.0, step - pool_attn - pool_comm))
            phases["pool"] = pph
            pool_busy = pool_attn / step if step > 0 else 0.0
    prefill = predict_prefill(cfg, cal, bw, flops)
    return {"step_s": step, "phases": phases, "pool_busy_fraction": pool_busy, "prefill_s": prefill,
            "calibration": cal.source}


def predict_prefill(cfg, cal, bw, flops) -> float:
    """Prefill: GEMM FLOPs of every prompt token plus causal attention FLOPs, at the GEMM efficiency."""
    m, s, w = cfg.model, cfg.strategy, cfg.workload
    lens = prompt_lengths(w)
    tokens = sum(lens)
    dense = m.n_layers * (4 * m.hidden**2 + 2 * m.hidden * m.ffn_hidden)
    attn = sum(2 * n * n * m.hidden for n in lens) * m.n_layers  # causal: half of 4 n^2 h
    ranks = s.tp * s.pp if s.kind != "fa_pool" else s.tp
    return (2 * tokens * dense + attn) / (flops * ranks) + 2 * tokens * m.hidden * m.vocab_size / (flops * s.tp)


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


def check(root: str | Path) -> list[dict]:
    """Predicted vs measured mean TPOT for every measured ok record under root (eager engines)."""
    from omegaconf import OmegaConf

    from harness.collect import find_records

    good, _ = find_records(root)
    rows = []
    for path, rec in good:
        if rec.status != "ok" or rec.env.get("source", "measured") != "measured":
            continue
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig), rec.config))
        if cfg.hardware.device != "cuda":
            continue  # CPU/gloo runs measure the mechanics, not a GPU: nothing to predict
        pred = predict_step(cfg, eager=True)["step_s"] * 1e3
        meas = rec.metrics["mean_tpot_ms"]
        rows.append({"record": str(path.parent.name), "strategy": cfg.strategy.name, "workload": cfg.workload.name,
                     "batch": cfg.workload.batch_size, "measured_ms": meas, "predicted_ms": pred,
                     "rel_error": (pred - meas) / meas})
    return rows


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


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="predicted vs measured TPOT for the measured records under a directory")
    ap.add_argument("root", nargs="?", default=str(CALIBRATION_SET.parent))
    args = ap.parse_args(argv)
    print(f"calibration: {default_calibration()}")
    for title, rows in (("harness records (eager engines)", check(args.root)),
                        ("graphed steps of the benchmark (calibration set)", check_graphed() if CALIBRATION_SET.exists() else [])):
        print(f"\n## {title}")
        if not rows:
            print("(none)")
            continue
        print("| run | measured TPOT ms | predicted ms | rel. error |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['record']} | {r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | {r['rel_error']:+.1%} |")
        print(f"median |rel. error| = {statistics.median(abs(r['rel_error']) for r in rows):.1%} over {len(rows)}")


if __name__ == "__main__":
    main()
