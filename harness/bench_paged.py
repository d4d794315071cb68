"""The paged decode-attention kernel against this GPU's read bandwidth and against dense cuDNN, same bytes.

    python -m harness.bench_paged --out results/measured/<device>/paged     # on a GPU
    python -m harness.bench_paged --smoke --out /tmp/x                      # tiny shapes, CPU reference path

At contexts x block sizes, a batch that holds at least 2 GiB of one layer's KV (32 heads, head dim 128, bf16)
is stored in blocks at shuffled slots (as a pool holds them after many allocations and frees); the kernel's
achieved KV bytes/s is divided by the read bandwidth measured in the same run (a sum over 2 GiB), and put
beside dense cuDNN SDPA over the same bytes in contiguous [B, H, L, D] tensors. `--sweep` also times other
splits, tiles and warp counts, to tune the defaults. Writes paged.json and paged.md.

`--splits` instead times every power-of-two split count at the shapes engines give the kernel, rows x heads of
a micro-batch or a TP shard (split_shapes), and the splits `choose_splits` picks against the best of them.
Writes splits.json and splits.md.

`--ragged` times both work plans of the kernel (plan="splits" and plan="ragged", model/paged_attention.RaggedPlan)
and cuDNN's paged SDPA (backend="cudnn") on mixed-length batches: one 131072-token row among 63 rows of 1024, 48 and
4 rows of Mooncake conversation lengths (input + output / 2, at most 131072; `--trace`, by default the full trace in
.traces/, ../shared/traces or shared/traces when there is one, else the project's 300-request sample), and the
uniform 8K x 16, 16K x 8 and 32K x 4 (with dense cuDNN beside them), at blocks of 16, 64 and 256 tokens in shuffled
slots; each against the read bandwidth measured in the same run. Writes ragged.json and ragged.md. With
`--short-rows` the batches are instead 16-256 rows of 256-2048 tokens each (a closed loop's decode steps), at
`--blocks`.

`--step` times a whole serving step's decode attention: rows drawn (seeded) from the Mooncake trace's lengths until
their KV over `--step-layers` layers holds about `--step-gb` GB, in one pool [layers, 2, slots, heads, block,
head_dim] (the serving engines' layout) with the rows' blocks at shuffled slots; one step is one call per layer view
of the pool, all layers sharing the block table, timed together, for the split plan, the ragged plan at the serving
engines' programs per SM, and cuDNN. Skipped, with the reason printed and written, where the GPU lacks the memory.
Writes step.json and step.md.

Everywhere cuDNN's paged SDPA is a column: a shape cuDNN does not build is an error in its row, the rest go on.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from harness.bench_gpu import HEAD_DIM, HEADS, limits
from harness.benchlib import bench_setup, describe_device, md_table, timeit
from harness.record import device_environment
from model.attention import attention, backend_available
from harness.traces import PROJECT_ROOT, read_mooncake
from model.paged_attention import (CUDNN_DTYPES, CUDNN_INSTALL, PROGRAMS_PER_SM, RAGGED_PROGRAMS_PER_SM, STAGES,
                                    TILE_TOKENS, WARPS, RaggedPlan, choose_splits, cudnn_available, paged_decode,
                                    sm_count)


REPS, WARMUP = 100, 25  # ~0.5 ms calls: enough of them that clocks settle and the median is stable


def cudnn_not_run(q) -> str | None:
    """Why cuDNN's paged SDPA cannot run on q's device and dtype, or None."""
    if cudnn_available(q.device) and q.dtype in CUDNN_DTYPES:
        return None
    return f"not run: needs bf16/fp16 on CUDA and the cuDNN frontend ({CUDNN_INSTALL})"


def cudnn_paged_timing(q, k, v, table, lens, reps=REPS, warmup=WARMUP) -> dict:
    """paged_decode(backend="cudnn") timed: {"us", "out"}, or {"error"} where it cannot run or cuDNN builds no graph
    (the caller records the error in its row and goes on)."""
    why = cudnn_not_run(q)
    if why:
        return {"error": why}
    try:
        out, _ = paged_decode(q, k, v, table, lens, backend="cudnn")
        t = timeit(lambda: paged_decode(q, k, v, table, lens, backend="cudnn"), reps=reps, warmup=warmup)
    except Exception as e:  # a graph cuDNN does not build, or a failed execution, for this shape only
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"us": t * 1e6, "out": out}


def paged_layout(batch, context, block, dtype, device, seed=0, heads=HEADS, shuffled=True):
    """q [B, H, D]; K/V blocks at shuffled slots (as a pool holds them; shuffled=False: in order); block table
    [B, blocks]; lengths all = context. (A static rank's StageKV holds each head's blocks of a sequence in one span,
    read by the same kernel through strided views: model/parallel/static.py.)"""
    gen = torch.Generator(device=device).manual_seed(seed)
    n_blocks = -(-context // block)
    slots = batch * n_blocks
    k = torch.randn(slots, heads, block, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    v = torch.randn(slots, heads, block, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    order = torch.randperm(slots, device=device, generator=gen) if shuffled else torch.arange(slots, device=device)
    table = order.view(batch, n_blocks).to(torch.int32)
    q = torch.randn(batch, heads, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k, v, table, lens


def kernel_points(device, dtype, read_bw, contexts, blocks, total_bytes, sweep: bool) -> list[dict]:
    rows = []
    sms = sm_count(device)
    cudnn = "sdpa_cudnn" if backend_available("sdpa_cudnn", device) else "sdpa"
    for L in contexts:
        per_seq = L * HEADS * HEAD_DIM * 2 * torch.finfo(dtype).bits // 8
        batch = max(1, -(-total_bytes // per_seq))
        kv_bytes = batch * per_seq
        qd = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
        kd = torch.randn(batch, HEADS, L, HEAD_DIM, device=device, dtype=dtype)
        vd = torch.randn_like(kd)
        dense = timeit(lambda: attention(qd, kd, vd, backend=cudnn), reps=REPS, warmup=WARMUP)
        del qd, kd, vd
        for bs in blocks:
            q, k, v, table, lens = paged_layout(batch, L, bs, dtype, device)
            auto = choose_splits(batch, HEADS, table.shape[1] * bs, sms)
            cudnn_paged = cudnn_paged_timing(q, k, v, table, lens)
            if "us" in cudnn_paged:
                cudnn_cols = {"cudnn_paged_us": cudnn_paged["us"],
                              "cudnn_paged_ratio_to_read_bw": kv_bytes / cudnn_paged["us"] * 1e6 / read_bw,
                              "cudnn_paged_over_cudnn": cudnn_paged["us"] * 1e-6 / dense}
            else:
                cudnn_cols = {"cudnn_paged_error": cudnn_paged["error"]}
            variants = [(None, TILE_TOKENS, WARPS, STAGES)]
            if sweep:
                variants += [(s, t, w, st) for s in (auto, 2 * auto, 8 * auto) for t in (64, 128) for w in (4, 8)
                             for st in (2, 3)]
            for splits, tile, warps, stages in variants:
                try:
                    t = timeit(lambda: paged_decode(q, k, v, table, lens, splits=splits, tile=tile, warps=warps,
                                                    stages=stages), reps=REPS, warmup=WARMUP)
                except Exception as e:  # a setting the compiler refuses (e.g. shared memory) is reported, not fatal
                    rows.append({"context": L, "block": bs, "tile": tile, "warps": warps, "error": str(e)[:200]})
                    continue
                rows.append({"context": L, "block": bs, "batch": batch, "kv_gib": kv_bytes / 2**30,
                             "splits": splits or auto, "tile": tile, "warps": warps, "stages": stages,
                             "default": splits is None, "paged_us": t * 1e6, "paged_ratio_to_read_bw": kv_bytes / t / read_bw,
                             "cudnn_us": dense * 1e6, "cudnn_ratio_to_read_bw": kv_bytes / dense / read_bw,
                             "paged_over_cudnn": t / dense, **cudnn_cols})
            del q, k, v, table, lens, cudnn_paged
    return rows


def split_shapes(smoke: bool) -> list[tuple[int, int, int]]:
    """(context, heads, rows): the micro-batches of half-memory batches (32K x 36, 16K x 72, 8K x 140 in 1-8
    micro-batches) and of 8K x 16, over the heads of TP1, TP2 and TP4 shards."""
    if smoke:
        return [(64, 2, 3), (128, 4, 2)]
    return ([(32768, h, r) for h in (16, 32) for r in (4, 5, 9, 18, 36)] +
            [(16384, h, r) for h in (16, 32) for r in (9, 18, 36, 72)] +
            [(8192, h, r) for h in (8, 16, 32) for r in (4, 8, 16, 18, 35, 70)])


def split_points(device, dtype, read_bw, shapes, block: int) -> list[dict]:
    sms = sm_count(device)
    rows = []
    for context, heads, n in shapes:
        q, k, v, table, lens = paged_layout(n, context, block, dtype, device, heads=heads, shuffled=False)
        kv_bytes = 2 * k.numel() * k.element_size()
        ratio = {}
        for splits in (1, 2, 4, 8, 16, 32):
            if context // splits >= block:
                t = timeit(lambda: paged_decode(q, k, v, table, lens, splits=splits), reps=30, warmup=5)
                ratio[splits] = kv_bytes / t / read_bw
        chosen, best = choose_splits(n, heads, context, sms), max(ratio, key=ratio.get)
        rows.append({"context": context, "heads": heads, "rows": n, "programs_unsplit": n * heads,
                     "chosen_splits": chosen, "chosen_ratio_to_read_bw": ratio.get(chosen), "best_splits": best,
                     "best_ratio_to_read_bw": ratio[best], "chosen_over_best": ratio.get(chosen, 0) / ratio[best],
                     "unsplit_ratio_to_read_bw": ratio[1], "by_splits": ratio})
        del q, k, v
    return rows


def main(argv=None):
    def extra(ap):
        ap.add_argument("--sweep", action="store_true", help="also time other splits, tiles and warps")
        ap.add_argument("--splits", action="store_true", help="only the split counts at engine shapes (splits.md)")
        ap.add_argument("--ragged", action="store_true", help="only the work plans on mixed-length batches (ragged.md)")
        ap.add_argument("--trace", default=None, help="Mooncake JSONL trace of the --ragged and --step lengths")
        ap.add_argument("--short-rows", action="store_true",
                        help="--ragged: batches of many short rows (16-256 rows of 256-2048 tokens) instead")
        ap.add_argument("--blocks", default="16,64,256", help="--ragged: block sizes, comma-separated")
        ap.add_argument("--step", action="store_true", help="only a whole serving step's batch (step.md)")
        ap.add_argument("--step-gb", type=float, default=100.0, help="--step: KV of the step over all its layers, GB")
        ap.add_argument("--step-layers", type=int, default=4, help="--step: layers (calls) of the step")
        ap.add_argument("--step-blocks", default="16,64", help="--step: block sizes, comma-separated")

    args, out, device, dtype = bench_setup(__doc__, argv, extra)
    if args.splits:
        return splits_main(args, out, device, dtype)
    if args.ragged:
        return ragged_main(args, out, device, dtype)
    if args.step:
        return step_main(args, out, device, dtype)
    contexts, blocks, total = ([64, 128], [16, 64], 1 << 20) if args.smoke else ([8192, 16384, 32768], [16, 64, 256], 2 << 30)
    res = {"device": device_environment(device), "dtype": str(dtype)}
    res["limits"] = lim = limits(device, dtype, args.smoke)
    print(f"# {res['device']}\n# read {lim['read_bytes_per_s'] / 1e12:.3f} TB/s", flush=True)
    res["points"] = rows = kernel_points(device, dtype, lim["read_bytes_per_s"], contexts, blocks, total, args.sweep)
    cols = ["context", "block", "batch", "kv_gib", "splits", "tile", "warps", "stages", "paged_us", "paged_ratio_to_read_bw",
            "cudnn_us", "cudnn_ratio_to_read_bw", "paged_over_cudnn"]
    defaults = [r for r in rows if r.get("default")]
    cudnn_cols = ["context", "block", "batch", "kv_gib", "paged_ratio_to_read_bw", "cudnn_paged_ratio_to_read_bw",
                  "cudnn_ratio_to_read_bw", "paged_over_cudnn", "cudnn_paged_over_cudnn", "cudnn_paged_error"]
    md = [f"# Paged decode attention on {describe_device(res['device'])}\n",
          f"versions: {json.dumps(res['device'])}\n", f"read bandwidth: {lim['read_bytes_per_s'] / 1e12:.3f} TB/s\n",
          "## default kernel settings\n" + md_table(defaults, cols),
          "## Triton (split plan), cuDNN paged and dense cuDNN over the same bytes\n\n"
          "paged = Triton's split plan; cudnn_paged = paged_decode(backend=\"cudnn\"), cuDNN's paged SDPA over the same "
          "blocks; cudnn = dense cuDNN SDPA over contiguous K/V; *_over_cudnn = time over dense cuDNN's time\n\n"
          + md_table(defaults, cudnn_cols, missing="")]
    if args.sweep:
        best = {}
        for r in (r for r in rows if "error" not in r):
            key = (r["context"], r["block"])
            if key not in best or r["paged_us"] < best[key]["paged_us"]:
                best[key] = r
        md.append("## best of the sweep per point\n" + md_table(list(best.values()), cols))
        md.append("## sweep\n" + md_table(rows, cols))
    text = "\n".join(md)
    print(text, flush=True)
    (out / "paged.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "paged.md").write_text(text)
    return res


def splits_main(args, out, device, dtype) -> dict:
    res = {"device": device_environment(device), "dtype": str(dtype)}
    res["limits"] = lim = limits(device, dtype, args.smoke)
    res["points"] = rows = split_points(device, dtype, lim["read_bytes_per_s"], split_shapes(args.smoke),
                                        16 if args.smoke else 256)
    cols = ["context", "heads", "rows", "programs_unsplit", "unsplit_ratio_to_read_bw", "chosen_splits",
            "chosen_ratio_to_read_bw", "best_splits", "best_ratio_to_read_bw", "chosen_over_best"]
    text = (f"# Paged decode attention: splits at engine shapes on {describe_device(res['device'])}\n\n"
            f"versions: {json.dumps(res['device'])}\n\nread bandwidth: {lim['read_bytes_per_s'] / 1e12:.3f} TB/s; "
            f"blocks of {16 if args.smoke else 256} tokens; chosen = model/paged_attention.choose_splits\n\n"
            + md_table(rows, cols))
    print(text, flush=True)
    (out / "splits.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "splits.md").write_text(text + "\n")
    return res


# the full trace: carried into the checkout's .traces/ (git-ignored), or in the shared folder beside the checkouts or
# inside a checkout that carries one
FULL_TRACES = [PROJECT_ROOT / ".traces" / "mooncake_conversation_trace.jsonl"] + [
    root / "shared" / "traces" / "mooncake_conversation_trace.jsonl" for root in (PROJECT_ROOT.parent, PROJECT_ROOT)]
SAMPLE_TRACE = PROJECT_ROOT / "results" / "reference" / "traces" / "mooncake_conversation_sample.jsonl"
MAX_CONTEXT = 131072


def ragged_layout(lens, block, dtype, device, seed=0, heads=HEADS):
    """q [n, H, D]; K/V of the rows' blocks at shuffled slots of a pool that holds just them; block table
    [n, the longest row's blocks], entries past a row's blocks 0; lengths `lens`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    counts = [-(-n // block) for n in lens]
    slots = max(1, sum(counts))
    k = torch.randn(slots, heads, block, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    v = torch.randn(slots, heads, block, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    order = torch.randperm(slots, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.zeros(len(lens), max(1, max(counts)), dtype=torch.int32)
    first = 0
    for row, c in enumerate(counts):
        table[row, :c] = torch.tensor(order[first:first + c], dtype=torch.int32)
        first += c
    q = torch.randn(len(lens), heads, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    return q, k, v, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def mooncake_lengths(path: Path, rows: int, cap: int, seed: int = 0) -> list[int]:
    """Context lengths of `rows` requests drawn (seeded) from a Mooncake trace: input + output / 2 (a request
    halfway through its decode), at most `cap`."""
    _, prompts, outputs, _, _ = read_mooncake(path)
    picked = random.Random(seed).sample(range(len(prompts)), rows)
    return [min(prompts[i] + outputs[i] // 2, cap) for i in picked]


def short_row_batches(smoke: bool) -> list[tuple[str, list[int]]]:
    """Many short rows, as a closed loop's decode steps have them: rows x length, from 16 to 256 rows of 256-2048
    tokens (a work item per row and head, each walking few tiles)."""
    if smoke:
        return [("8x64", [64] * 8), ("4x128", [128] * 4)]
    return [(f"{n}x{length}", [length] * n) for n in (16, 64, 128, 256) for length in (256, 512, 1024, 2048)]


def ragged_batches(smoke: bool, trace: Path) -> list[tuple[str, list[int]]]:
    if smoke:
        cap = 512
        return [("1x256+3x16", [256] + [16] * 3), ("mooncake6", mooncake_lengths(trace, 6, cap)),
                ("mooncake2", mooncake_lengths(trace, 2, cap, seed=1)), ("64x4", [64] * 4), ("128x2", [128] * 2)]
    return [("1x128K+63x1K", [MAX_CONTEXT] + [1024] * 63), ("mooncake48", mooncake_lengths(trace, 48, MAX_CONTEXT)),
            ("mooncake4", mooncake_lengths(trace, 4, MAX_CONTEXT, seed=1)), ("8Kx16", [8192] * 16),
            ("16Kx8", [16384] * 8), ("32Kx4", [32768] * 4)]


def dense_cudnn_timing(lens, heads, dtype, device, reps=REPS, warmup=WARMUP) -> dict:
    """Dense cuDNN SDPA (the sdpa_cudnn backend, else sdpa) over contiguous [n, H, L, D] K/V of a batch whose rows share
    one length L: {"us"}, or {"error"} for a ragged batch (no dense layout without padding) or a failure."""
    if len(set(lens)) != 1:
        return {"error": "ragged rows: no dense layout"}
    backend = "sdpa_cudnn" if backend_available("sdpa_cudnn", device) else "sdpa"
    try:
        qd = torch.randn(len(lens), heads, 1, HEAD_DIM, device=device, dtype=dtype)
        kd = torch.randn(len(lens), heads, lens[0], HEAD_DIM, device=device, dtype=dtype)
        vd = torch.randn_like(kd)
        t = timeit(lambda: attention(qd, kd, vd, backend=backend), reps=reps, warmup=warmup)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"us": t * 1e6}


# The kernels a --ragged point times: label -> (backend, programs per SM of a RaggedPlan, or None for the split plan)
RAGGED_VARIANTS = {"splits": ("triton", None), "ragged": ("triton", PROGRAMS_PER_SM),
                   "ragged_x4": ("triton", 4 * PROGRAMS_PER_SM), "cudnn": ("cudnn", None)}


def time_variants(q, k, v, table, lens_t, layers, variants, common, kv_bytes, read_bw, reps, warmup) -> list[dict]:
    """One row per variant (RAGGED_VARIANTS' labels): the time of one call on each of `layers` (k, v) pairs in turn
    (the same table, lengths and query), the ratio kv_bytes / time / read_bw, and each output's largest difference
    from the split plan's; a ragged variant also times its plan's build alone (plan_us). A variant that fails gets
    its error in its row; the others still run."""
    n, width = table.shape
    heads, bs = k.shape[1], k.shape[2]
    sms = sm_count(q.device)
    rows, base_out, splits_us = [], None, None
    for label in variants:
        backend, pps = RAGGED_VARIANTS[label]
        row = {**common, "plan": label}
        if backend == "cudnn":
            plan = "splits"
        elif pps is None:
            plan = "splits"
            row["splits"] = choose_splits(n, heads, width * bs, sms)
        else:
            plan = RaggedPlan(n, width, bs, heads, sms, q.device, programs_per_sm=pps)
            plan.build(lens_t)
            row.update(chunk=int(plan.chunk), items=int(plan.count), max_items=plan.max_items)

        def step():
            return [paged_decode(q, kl, vl, table, lens_t, plan=plan, backend=backend) for kl, vl in layers]

        if backend == "cudnn" and cudnn_not_run(q):
            rows.append({**row, "error": cudnn_not_run(q)})
            continue
        try:  # the first call builds cuDNN's graph: a shape it does not build fails here
            out = step()[0][0]
            t = timeit(step, reps=reps, warmup=warmup)
        except Exception as e:  # a failing variant is reported, the others still run
            rows.append({**row, "error": str(e)[:300]})
            continue
        if base_out is None:
            base_out = out
        if label == "splits":
            splits_us = t * 1e6
        row.update(us=t * 1e6, ratio_to_read_bw=kv_bytes / t / read_bw,
                   max_abs_diff_vs_splits=float((out - base_out).abs().max()),
                   speedup_over_splits=splits_us / (t * 1e6) if splits_us else None)
        if isinstance(plan, RaggedPlan):  # the work list's build alone (a serving pass builds it once, not a layer)
            row["plan_us"] = timeit(lambda: plan.build(lens_t), reps=reps, warmup=warmup) * 1e6
        rows.append(row)
    return rows


def ragged_points(device, dtype, read_bw, batches, blocks, heads=HEADS, reps=REPS, warmup=WARMUP,
                  variants=tuple(RAGGED_VARIANTS)) -> list[dict]:
    """Each batch x block: plan="splits" (choose_splits), a RaggedPlan made once for the shapes (as an engine holds
    one) at PROGRAMS_PER_SM and at 4x, and cuDNN's paged SDPA; for a batch of one length also dense cuDNN (plan
    "dense_cudnn", contiguous K/V, no blocks: timed once per batch); achieved KV bytes/s over the read bandwidth."""
    rows = []
    for name, lens in batches:
        kv_bytes = 2 * sum(lens) * heads * HEAD_DIM * torch.finfo(dtype).bits // 8
        dense = dense_cudnn_timing(lens, heads, dtype, device, reps, warmup)
        for bs in blocks:
            q, k, v, table, lens_t = ragged_layout(lens, bs, dtype, device, heads=heads)
            common = {"batch": name, "block": bs, "rows": len(lens), "tokens": sum(lens), "max_len": max(lens),
                      "kv_gib": kv_bytes / 2**30}
            rows += time_variants(q, k, v, table, lens_t, [(k, v)], variants, common, kv_bytes, read_bw, reps, warmup)
            if "us" in dense:
                rows.append({**common, "plan": "dense_cudnn", "us": dense["us"],
                             "ratio_to_read_bw": kv_bytes / dense["us"] * 1e6 / read_bw})
            del q, k, v, table, lens_t
    return rows


def default_trace(given: str | None) -> Path:
    return Path(given) if given else next((t for t in FULL_TRACES if t.is_file()), SAMPLE_TRACE)


def ragged_main(args, out, device, dtype) -> dict:
    trace = default_trace(args.trace)
    batches = short_row_batches(args.smoke) if args.short_rows else ragged_batches(args.smoke, trace)
    blocks = [16] if args.smoke else [int(b) for b in args.blocks.split(",")]
    res = {"device": device_environment(device), "dtype": str(dtype), "trace": str(trace),
           "batches": {name: lens for name, lens in batches}}
    res["limits"] = lim = limits(device, dtype, args.smoke)
    print(f"# {res['device']}\n# read {lim['read_bytes_per_s'] / 1e12:.3f} TB/s; trace {trace}", flush=True)
    heads = 2 if args.smoke else HEADS  # smoke: the CPU reference path, a few calls of small shapes
    res["heads"] = heads
    res["points"] = rows = ragged_points(device, dtype, lim["read_bytes_per_s"], batches, blocks, heads,
                                         *((3, 1) if args.smoke else (REPS, WARMUP)))
    by_point = {}
    for r in (r for r in rows if "error" not in r):
        by_point.setdefault((r["batch"], r["block"]), {"batch": r["batch"], "block": r["block"], "rows": r["rows"],
                                                      "max_len": r["max_len"]})[r["plan"]] = r["ratio_to_read_bw"]
    for p in by_point.values():
        p["ragged_over_splits"] = p["ragged"] / p["splits"] if p.get("splits") and p.get("ragged") else None
        p["cudnn_over_ragged_x4"] = p["cudnn"] / p["ragged_x4"] if p.get("cudnn") and p.get("ragged_x4") else None
    cols = ["batch", "block", "rows", "tokens", "max_len", "kv_gib", "plan", "splits", "chunk", "items", "max_items",
            "us", "ratio_to_read_bw", "speedup_over_splits", "max_abs_diff_vs_splits"]
    errors = [r for r in rows if "error" in r]
    text = (f"# Paged decode attention: work plans on mixed-length batches on {describe_device(res['device'])}\n\n"
            f"versions: {json.dumps(res['device'])}\n\nread bandwidth: {lim['read_bytes_per_s'] / 1e12:.3f} TB/s; "
            f"{heads} heads, head dim {HEAD_DIM}, {dtype}, blocks at shuffled slots; Mooncake lengths from {trace.name} "
            f"(input + output / 2, at most {MAX_CONTEXT}); ratio = KV bytes / time / read bandwidth; cudnn = "
            "paged_decode(backend=\"cudnn\"); dense_cudnn = cuDNN SDPA over contiguous K/V (batches of one length)\n\n"
            "## ratio to the read bandwidth per plan\n\n"
            + md_table(list(by_point.values()), ["batch", "block", "rows", "max_len", "splits", "ragged", "ragged_x4",
                                                 "cudnn", "dense_cudnn", "ragged_over_splits", "cudnn_over_ragged_x4"])
            + "\n## every point\n\n" + md_table(rows, cols)
            + ("\n## errors\n\n" + md_table(errors, ["batch", "block", "plan", "error"], skip_errors=False)
               if errors else ""))
    print(text, flush=True)
    (out / "ragged.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "ragged.md").write_text(text)
    return res


STEP_VARIANTS = ("splits", "ragged_x4", "cudnn")  # ragged_x4: the serving engines' RAGGED_PROGRAMS_PER_SM
assert RAGGED_VARIANTS["ragged_x4"][1] == RAGGED_PROGRAMS_PER_SM
STEP_HEADROOM = 2 << 30  # free bytes the step leaves beside its pool: partials, plans, cuDNN's workspace


def step_lengths(trace: Path, kv_bytes: float, token_bytes: int, cap: int = MAX_CONTEXT, seed: int = 0) -> list[int]:
    """Context lengths of requests drawn (seeded, without replacement until the trace is used up, then again) from a
    Mooncake trace, input + output / 2 at most `cap` each, until their KV (token_bytes a token, all layers) reaches
    kv_bytes."""
    _, prompts, outputs, _, _ = read_mooncake(trace)
    rng, lens, total = random.Random(seed), [], 0
    while total < kv_bytes:
        order = list(range(len(prompts)))
        rng.shuffle(order)
        for i in order:
            lens.append(min(prompts[i] + outputs[i] // 2, cap))
            total += lens[-1] * token_bytes
            if total >= kv_bytes:
                break
    return lens


def step_layout(lens, layers, block, dtype, device, heads=HEADS, seed=0):
    """q [n, H, D]; one pool [layers, 2, slots, H, block, D] holding the rows' blocks (at shuffled slots, the same for
    every layer), filled with normal values in place; block table [n, the longest row's blocks]; lengths."""
    counts = [-(-n // block) for n in lens]
    slots = sum(counts)
    pool = torch.empty(layers, 2, slots, heads, block, HEAD_DIM, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in range(layers):  # one layer at a time: normal_ of the whole pool would need a temporary as large
        pool[layer].normal_(generator=gen)
    order = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))
    table = torch.zeros(len(lens), max(counts), dtype=torch.int32)
    first = 0
    for row, c in enumerate(counts):
        table[row, :c] = order[first:first + c]
        first += c
    q = torch.randn(len(lens), heads, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    return q, pool, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def step_skip_reason(kv_bytes: int, device) -> str | None:
    """Why a step of kv_bytes cannot run on `device` (its pool and STEP_HEADROOM exceed the free memory), or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    need = kv_bytes + STEP_HEADROOM
    if free >= need:
        return None
    return (f"needs {need / 1e9:.1f} GB free on the GPU for a {kv_bytes / 1e9:.1f} GB pool; {free / 1e9:.1f} GB of "
            f"{total / 1e9:.1f} GB are free (a smaller --step-gb fits)")


def step_main(args, out, device, dtype) -> dict:
    trace = default_trace(args.trace)
    heads = 2 if args.smoke else HEADS
    layers = args.step_layers
    token_bytes = layers * 2 * heads * HEAD_DIM * torch.finfo(dtype).bits // 8  # K and V of every layer
    target = 2e6 if args.smoke else args.step_gb * 1e9
    lens = step_lengths(trace, target, token_bytes, cap=512 if args.smoke else MAX_CONTEXT)
    kv_bytes = sum(lens) * token_bytes
    blocks = [16] if args.smoke else [int(b) for b in args.step_blocks.split(",")]
    res = {"device": device_environment(device), "dtype": str(dtype), "trace": str(trace), "heads": heads,
           "layers": layers, "step_gb": args.step_gb, "lens": lens, "kv_bytes": kv_bytes, "points": []}
    head = (f"# Paged decode attention: a whole serving step on {describe_device(res['device'])}\n\n"
            f"versions: {json.dumps(res['device'])}\n\n{len(lens)} rows drawn from {trace.name} (input + output / 2, "
            f"at most {MAX_CONTEXT}; {sum(lens)} tokens, longest {max(lens)}): {kv_bytes / 1e9:.1f} GB of KV over "
            f"{layers} layers ({heads} heads, head dim {HEAD_DIM}, {dtype}), one pool [layers, 2, slots, heads, block, "
            f"head_dim] with the rows' blocks at shuffled slots. A step = one call per layer view of the pool (the same "
            f"block table), timed together; ratio = the step's KV bytes / its time / read bandwidth.\n\n")
    res["skipped"] = step_skip_reason(kv_bytes, device)
    if res["skipped"]:
        text = head + f"skipped: {res['skipped']}\n"
        print(text, flush=True)
        (out / "step.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "step.md").write_text(text)
        return res
    res["limits"] = lim = limits(device, dtype, args.smoke)
    read_bw = lim["read_bytes_per_s"]
    print(f"# {res['device']}\n# read {read_bw / 1e12:.3f} TB/s; trace {trace}; {len(lens)} rows, "
          f"{kv_bytes / 1e9:.1f} GB", flush=True)
    reps, warmup = (2, 1) if args.smoke else (20, 5)  # a step reads the whole pool: tens of ms
    for bs in blocks:
        q, pool, table, lens_t = step_layout(lens, layers, bs, dtype, device, heads=heads)
        common = {"block": bs, "rows": len(lens), "tokens": sum(lens), "max_len": max(lens), "layers": layers,
                  "kv_gb": kv_bytes / 1e9}
        views = [(pool[layer, 0], pool[layer, 1]) for layer in range(layers)]
        res["points"] += time_variants(q, pool[0, 0], pool[0, 1], table, lens_t, views, STEP_VARIANTS, common,
                                       kv_bytes, read_bw, reps, warmup)
        del q, pool, table, lens_t, views
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = res["points"]
    errors = [r for r in rows if "error" in r]
    text = (head + f"read bandwidth: {read_bw / 1e12:.3f} TB/s, measured in the same call\n\n"
            + md_table(rows, ["block", "rows", "tokens", "max_len", "layers", "kv_gb", "plan", "splits", "chunk",
                              "items", "us", "ratio_to_read_bw", "speedup_over_splits", "max_abs_diff_vs_splits"])
            + ("\n## errors\n\n" + md_table(errors, ["block", "plan", "error"], skip_errors=False) if errors else ""))
    print(text, flush=True)
    (out / "step.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "step.md").write_text(text)
    return res


if __name__ == "__main__":
    main()
