"""GPU benchmark: the decode path measured against this machine's own limits, measured in the same run.

    python -m harness.bench_gpu --out results/measured/<device>     # on a GPU
    python -m harness.bench_gpu --smoke --out /tmp/x                # tiny shapes on the CPU (tests)

Prints and writes (bench_gpu.json, bench_gpu.md, profile.txt):
  0. limits: HBM read bandwidth (a sum over 2 GiB), copy bandwidth, bf16 GEMM peak (8192^3)
  1. decode attention over a KV shard (1 query/sequence, 32 heads, head dim 128), contexts x shard counts
     x kernels: achieved KV bytes/s over the read bandwidth
  2. the paper model's whole decode step (CUDA graph, static KV) at context x batch: TPOT over the
     roofline (weight + KV bytes) / read bandwidth, and FLOPs / peak
  3. LSE merge of P partials as a fraction of the attention it merges
  4. projection and FFN GEMMs at the shard shapes of TP 1..16 (these calibrate harness/perfmodel.py)
  5. a torch.profiler summary of one eager decode step
  6. the harness's eager engine step
  7. prefill (the static engine, whole prompts and in chunks) over its FLOP roofline: FLOPs / GEMM peak
Each number is a median of timed calls (harness/benchlib.timeit: triton's do_bench on a GPU,
torch.utils.benchmark on the CPU); the device and its driver, CUDA, torch, NCCL and Triton versions head bench_gpu.md.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from harness.benchlib import bench_setup, describe_device, md_table, timeit, timeit_fixed
from harness.record import device_environment

from model.attention import attention, backend_available, merge_partials
from model.config import PRESETS
from model.gpu_decode import GraphedDecodeStep
from model.transformer import build_model

HEADS, HEAD_DIM = 32, 128


def limits(device, dtype, smoke: bool) -> dict:
    n = (1 << 20) if smoke else (1 << 30)  # elements: 2 GiB of bf16 on the GPU
    x = torch.randn(n, device=device, dtype=dtype)
    y = torch.empty_like(x)
    read = timeit(lambda: x.sum())
    copy = timeit(lambda: y.copy_(x))
    g = 256 if smoke else 8192
    a, b = torch.randn(g, g, device=device, dtype=dtype), torch.randn(g, g, device=device, dtype=dtype)
    gemm = timeit(lambda: a @ b, reps=10)
    del x, y, a, b
    return {"read_bytes_per_s": n * x_bytes(dtype) / read, "copy_bytes_per_s": 2 * n * x_bytes(dtype) / copy,
            "gemm_flops_per_s": 2 * g**3 / gemm}


def x_bytes(dtype) -> int:
    return torch.finfo(dtype).bits // 8


def attention_shards(device, dtype, read_bw, contexts, shard_counts, backends, total_bytes) -> list[dict]:
    rows = []
    for L in contexts:
        batch = max(1, total_bytes // (L * HEADS * HEAD_DIM * 2 * x_bytes(dtype)))
        for P in shard_counts:
            n = math.ceil(L / P)
            if n < 1:
                continue
            q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
            k = torch.randn(batch, HEADS, n, HEAD_DIM, device=device, dtype=dtype)
            v = torch.randn_like(k)
            kv = k.nbytes + v.nbytes
            for be in backends:
                try:
                    t = timeit(lambda: attention(q, k, v, backend=be))
                except Exception as e:  # a kernel that refuses this shape is reported, not fatal
                    rows.append({"context": L, "shards": P, "batch": batch, "backend": be, "error": str(e)[:200]})
                    continue
                rows.append({"context": L, "shards": P, "shard_tokens": n, "batch": batch, "backend": be,
                             "kv_bytes": kv, "time_us": t * 1e6, "bytes_per_s": kv / t, "ratio_to_read_bw": kv / t / read_bw})
            del q, k, v
    return rows


def weight_read_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step reads: all but the embedding table, of which only `batch` rows."""
    emb = model.tok_emb.weight
    total = sum(p.nbytes for p in model.parameters())
    return total - emb.nbytes + batch * emb.shape[1] * emb.element_size()


def step_flops(cfg, batch: int, context: int) -> int:
    dense = cfg.n_layers * (4 * cfg.hidden**2 + 2 * cfg.hidden * cfg.ffn_hidden) + cfg.vocab_size * cfg.hidden
    return 2 * batch * dense + 4 * batch * (context + 1) * cfg.hidden * cfg.n_layers


def prefill_flops(cfg, batch: int, length: int) -> int:
    """FLOPs of prefilling `batch` prompts of `length` tokens: every token through the QKV, output and FFN GEMMs,
    causal attention (q k^T and p v over the keys at or before each query: 4 h (i + 1) for query i), and the LM
    head on each prompt's last position only."""
    h, layers = cfg.hidden, cfg.n_layers
    dense = 2 * batch * length * layers * (4 * h * h + 2 * h * cfg.ffn_hidden)
    causal = 2 * batch * layers * h * length * (length + 1)
    return dense + causal + 2 * batch * h * cfg.vocab_size


def prefills(cfg, device, dtype, lim, points, kv_block: int) -> list[dict]:
    """The harness's own prefill (the static engine with tp = pp = 1: the `reference` strategy) of `batch` equal
    prompts of `length` tokens, whole (chunk 0) or in chunks, against its FLOP roofline: prefill FLOPs over the
    bf16 GEMM peak measured in the same run. Peak memory shows what chunking bounds."""
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:  # the engine makes its (one-rank) process groups
        from harness.launch import free_port

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    try:
        return [_prefill_point(cfg, device, dtype, lim, kv_block, *point) for point in points]
    finally:
        if own_group:
            dist.destroy_process_group()


def _prefill_point(cfg, device, dtype, lim, kv_block: int, length: int, batch: int, chunk: int) -> dict:
    from harness.measure import PhaseTimer
    from harness.strategies.reference import ReferenceConfig
    from model.parallel.static import StaticEngine

    strategy = ReferenceConfig(kv_block=kv_block, prefill_chunk=chunk)
    engine = StaticEngine(cfg, strategy, 0, 1, device, dtype, "sdpa", PhaseTimer(device))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (length,), generator=gen) for _ in range(batch)]
    engine.prefill(prompts, length + 16)  # the cache and the kernels, once
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timeit(lambda: engine.prefill(prompts, length + 16), reps=3, warmup=1)
    flops = prefill_flops(cfg, batch, length)
    roof = flops / lim["gemm_flops_per_s"]
    row = {"length": length, "batch": batch, "chunk": chunk or length, "prefill_ms": t * 1e3, "roofline_ms": roof * 1e3,
           "ratio_to_roofline": t / roof, "tflops": flops / t / 1e12,
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def decode_steps(model, device, lim, points, backend, graph: bool) -> list[dict]:
    rows = []
    for L, B in points:
        try:
            step = GraphedDecodeStep(model, B, L, backend=backend, graph=graph)
            t = timeit(step, reps=20)
            wbytes, kvbytes = weight_read_bytes(model, B), step.kv_bytes()
            roof = (wbytes + kvbytes) / lim["read_bytes_per_s"]
            flops = step_flops(model.cfg, B, L)
            rows.append({"context": L, "batch": B, "backend": backend, "graph": graph, "tpot_ms": t * 1e3,
                         "weight_bytes": wbytes, "kv_bytes": kvbytes, "roofline_ms": roof * 1e3,
                         "ratio_to_roofline": t / roof, "flops": flops, "ratio_flops_to_peak": flops / t / lim["gemm_flops_per_s"]})
            del step
        except Exception as e:  # e.g. OOM at a large point: recorded, the rest goes on
            rows.append({"context": L, "batch": B, "backend": backend, "graph": graph, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def merge_cost(device, dtype, contexts, shard_counts, batch_bytes, backend) -> list[dict]:
    rows = []
    for L in contexts:
        batch = max(1, batch_bytes // (L * HEADS * HEAD_DIM * 2 * x_bytes(dtype)))
        q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(batch, HEADS, L, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn_like(k)
        t_attn = timeit(lambda: attention(q, k, v, backend=backend))
        for P in shard_counts:  # partials land in one [P, ...] buffer, as the pool's receives fill it
            outs = torch.randn(P, batch, HEADS, HEAD_DIM, device=device, dtype=dtype)
            lses = torch.randn(P, batch, HEADS, device=device)
            t_merge = timeit(lambda: merge_partials(outs, lses))
            row = {"context": L, "shards": P, "batch": batch, "attention_us": t_attn * 1e6,
                   "merge_us": t_merge * 1e6, "merge_fraction": t_merge / t_attn}
            if device.type == "cuda":  # inside a CUDA graph, as in the graphed step: no launch gaps
                g = torch.cuda.CUDAGraph()
                merge_partials(outs, lses)
                with torch.cuda.graph(g):
                    merge_partials(outs, lses)
                t_graph = timeit(g.replay)
                row.update(merge_graph_us=t_graph * 1e6, merge_graph_fraction=t_graph / t_attn)
            rows.append(row)
        del q, k, v
    return rows


def gemms(device, dtype, lim, cfg, tps, batches) -> list[dict]:
    rows = []
    h, f = cfg.hidden, cfg.ffn_hidden
    for tp in tps:
        shapes = {"qkv": (h, 3 * h // tp), "out": (h // tp, h), "up": (h, f // tp), "down": (f // tp, h)}
        for B in batches:
            for name, (kin, kout) in shapes.items():
                x = torch.randn(B, kin, device=device, dtype=dtype)
                w = torch.randn(kin, kout, device=device, dtype=dtype)
                t = timeit(lambda: x @ w)
                flops, nbytes = 2 * B * kin * kout, (B * kin + kin * kout + B * kout) * x_bytes(dtype)
                bound = max(flops / lim["gemm_flops_per_s"], nbytes / lim["read_bytes_per_s"])
                rows.append({"tp": tp, "batch": B, "gemm": name, "k": kin, "n": kout, "time_us": t * 1e6,
                             "tflops": flops / t / 1e12, "bytes": nbytes, "efficiency": bound / t})
    return rows


def profile_step(model, B, L, backend, out: Path) -> str:
    step = GraphedDecodeStep(model, B, L, backend=backend, graph=False)
    step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15)
    (out / "profile.txt").write_text(f"one eager decode step, batch {B}, context {L}, backend {backend}\n{table}\n")
    return table


def engine_steps(cfg, device, dtype, points, backend, out: Path) -> list[dict]:
    """The harness's own reference engine (eager, LocalKV cache, phase timers: what fapool-bench records
    measure) at several points: how far the strategies' eager path is from the graphed step, and the
    calibration of the performance model's eager overhead. The first point is also profiled."""
    from harness.measure import PhaseTimer
    from model.parallel.engine import ReferenceEngine

    rows = []
    eng = None
    for i, (L, B) in enumerate(points):
        del eng
        if device.type == "cuda":
            torch.cuda.empty_cache()
        eng = ReferenceEngine(cfg, device, dtype, backend, PhaseTimer(device))
        tok = eng.synthetic_prefill(torch.full((B,), L), L + 40, 0)
        for _ in range(3):
            tok = eng.decode(tok)
        # a fixed number of calls: each decode step grows the cache, which holds 40 tokens past the prompt
        # (do_bench's count follows a time budget, hundreds of calls where a step is short)
        t = timeit_fixed(lambda: eng.decode(tok), reps=10, warmup=1)
        rows.append({"context": L, "batch": B, "backend": backend, "engine_step_ms": t * 1e3})
        if i == 0:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch.profiler.profile(activities=acts) as prof:
                eng.decode(tok)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=20)
            (out / "profile_engine.txt").write_text(f"ReferenceEngine.decode, batch {B}, context {L}, backend {backend}\n{table}\n")
    return rows


def main(argv=None):
    args, out, device, dtype = bench_setup(__doc__, argv, lambda ap: ap.add_argument(
        "--skip", default="", help="comma-separated sections to skip: shards,steps,merge,gemms,profile,engine,prefill"))
    skip = set(filter(None, args.skip.split(",")))
    cfg = PRESETS["tiny" if args.smoke else "paper"]
    if args.smoke:
        contexts, shard_counts, total = [64, 128], [1, 2, 4], 1 << 20
        step_points, tps, batches, prof = [(64, 2), (128, 4)], [1, 2], [4], (2, 64)
    else:
        contexts, shard_counts, total = [4096, 8192, 16384, 32768], [1, 2, 4, 8, 16, 32], 2 << 30
        step_points = [(2048, 256), (8192, 64), (8192, 128), (16384, 8), (16384, 16), (16384, 32), (16384, 64),
                       (32768, 16), (32768, 32)]
        tps, batches, prof = [1, 2, 4, 8, 16], [64, 256, 1024], (32, 16384)
    backends = [b for b in ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn") if backend_available(b, device)] or ["sdpa"]
    fast = backends[0]
    res = {"device": device_environment(device), "dtype": str(dtype), "model": cfg.name, "backends": backends}
    res["limits"] = lim = limits(device, dtype, args.smoke)
    print(f"# {res['device'].get('device_name')}  read {lim['read_bytes_per_s'] / 1e12:.2f} TB/s  "
          f"copy {lim['copy_bytes_per_s'] / 1e12:.2f} TB/s  GEMM {lim['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    md = [f"# GPU benchmark on {describe_device(res['device'])}\n", f"limits: {json.dumps(lim)}\n"]
    if "shards" not in skip:
        res["attention_shards"] = attention_shards(device, dtype, lim["read_bytes_per_s"], contexts, shard_counts, backends, total)
        md.append("## 1. decode attention over a KV shard\n" + md_table(res["attention_shards"], ["context", "shards", "batch", "backend", "time_us", "ratio_to_read_bw"]))
        print(md[-1], flush=True)
    model = build_model(cfg, dtype, device)
    if "steps" not in skip:
        graph = device.type == "cuda"
        rows = decode_steps(model, device, lim, step_points, fast, graph)
        if device.type == "cuda" and "sdpa_flash" in backends:  # the note's flash baseline, two points
            rows += decode_steps(model, device, lim, step_points[3:6:2], "sdpa_flash", True)
            rows += decode_steps(model, device, lim, step_points[3:6:2], fast, False)  # eager, for the graph's gain
        res["decode_steps"] = rows
        md.append("## 2. decode step of the model\n" + md_table(rows, ["context", "batch", "backend", "graph", "tpot_ms", "roofline_ms", "ratio_to_roofline", "ratio_flops_to_peak"]))
        print(md[-1], flush=True)
    if "merge" not in skip:
        res["merge"] = merge_cost(device, dtype, contexts[-2:], [2, 4, 8, 32] if not args.smoke else [2, 4], total, fast)
        md.append("## 3. LSE merge cost\n" + md_table(res["merge"], ["context", "shards", "batch", "attention_us", "merge_us", "merge_fraction", "merge_graph_us", "merge_graph_fraction"]))
        print(md[-1], flush=True)
    if "gemms" not in skip:
        res["gemms"] = gemms(device, dtype, lim, cfg, tps, batches)
        md.append("## 4. GEMMs at TP shard shapes\n" + md_table(res["gemms"], ["tp", "batch", "gemm", "time_us", "tflops", "efficiency"]))
        print(md[-1], flush=True)
    if "profile" not in skip:
        res["profile"] = profile_step(model, *prof, fast, out)
        md.append("## 5. profile of one eager decode step\n```\n" + res["profile"] + "\n```\n")
        print(md[-1], flush=True)
    if "engine" not in skip:  # points apart from jobs/gpu_measure.sh's records, which validate the model
        points = [(32, 2), (64, 4)] if args.smoke else [(16384, 24), (4096, 32), (16384, 8), (32768, 16), (2048, 128),
                                                          (4096, 8), (8192, 16), (2048, 32), (32768, 4), (1024, 64)]
        res["engine_steps"] = engine_steps(cfg, device, dtype, points, "sdpa", out)
        md.append("## 6. the harness's eager engine step (attention_backend=sdpa)\n" + md_table(res["engine_steps"], ["context", "batch", "backend", "engine_step_ms"]))
        print(md[-1], flush=True)
    if "prefill" not in skip:
        points = [(64, 2, 0), (64, 2, 32)] if args.smoke else [
            (8192, 8, 0), (8192, 8, 2048), (16384, 4, 0), (16384, 4, 4096), (32768, 2, 0), (32768, 2, 4096)]
        res["prefill"] = prefills(cfg, device, dtype, lim, points, 16 if args.smoke else 256)
        md.append("## 7. prefill over its FLOP roofline (FLOPs / bf16 GEMM peak)\n" + md_table(
            res["prefill"], ["length", "batch", "chunk", "prefill_ms", "roofline_ms", "ratio_to_roofline", "tflops", "peak_gb"]))
        print(md[-1], flush=True)
    (out / "bench_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "bench_gpu.md").write_text("\n".join(md))
    return res


if __name__ == "__main__":
    main()
