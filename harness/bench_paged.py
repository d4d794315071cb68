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
on mixed-length batches: one 131072-token row among 63 rows of 1024, 48 and 4 rows of Mooncake conversation lengths
(input + output / 2, at most 131072; `--trace`, by default the full trace in ../shared/traces or shared/traces when
there is one, else the project's 300-request sample), and the uniform 8K x 16, 16K x 8 and 32K x 4, at blocks of 16, 64 and 256
tokens in shuffled slots; each against the read bandwidth measured in the same run. Writes ragged.json and
ragged.md.
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
from model.paged_attention import (PROGRAMS_PER_SM, STAGES, TILE_TOKENS, WARPS, RaggedPlan, choose_splits, paged_decode,
                                    sm_count)


REPS, WARMUP = 100, 25  # ~0.5 ms calls: enough of them that clocks settle and the median is stable


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
                             "paged_over_cudnn": t / dense})
            del q, k, v, table, lens
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
        ap.add_argument("--trace", default=None, help="Mooncake JSONL trace of the --ragged batches' lengths")

    args, out, device, dtype = bench_setup(__doc__, argv, extra)
    if args.splits:
        return splits_main(args, out, device, dtype)
    if args.ragged:
        return ragged_main(args, out, device, dtype)
    contexts, blocks, total = ([64, 128], [16, 64], 1 << 20) if args.smoke else ([8192, 16384, 32768], [16, 64, 256], 2 << 30)
    res = {"device": device_environment(device), "dtype": str(dtype)}
    res["limits"] = lim = limits(device, dtype, args.smoke)
    print(f"# {res['device']}\n# read {lim['read_bytes_per_s'] / 1e12:.3f} TB/s", flush=True)
    res["points"] = rows = kernel_points(device, dtype, lim["read_bytes_per_s"], contexts, blocks, total, args.sweep)
    cols = ["context", "block", "batch", "kv_gib", "splits", "tile", "warps", "stages", "paged_us", "paged_ratio_to_read_bw",
            "cudnn_us", "cudnn_ratio_to_read_bw", "paged_over_cudnn"]
    defaults = [r for r in rows if r.get("default")]
    md = [f"# Paged decode attention on {describe_device(res['device'])}\n",
          f"versions: {json.dumps(res['device'])}\n", f"read bandwidth: {lim['read_bytes_per_s'] / 1e12:.3f} TB/s\n",
          "## default kernel settings\n" + md_table(defaults, cols)]
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


# the full trace lives in the shared folder beside the checkouts, or inside a checkout that carries one
FULL_TRACES = [root / "shared" / "traces" / "mooncake_conversation_trace.jsonl" for root in (PROJECT_ROOT.parent, PROJECT_ROOT)]
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


def ragged_batches(smoke: bool, trace: Path) -> list[tuple[str, list[int]]]:
    if smoke:
        cap = 512
        return [("1x256+3x16", [256] + [16] * 3), ("mooncake6", mooncake_lengths(trace, 6, cap)),
                ("mooncake2", mooncake_lengths(trace, 2, cap, seed=1)), ("64x4", [64] * 4), ("128x2", [128] * 2)]
    return [("1x128K+63x1K", [MAX_CONTEXT] + [1024] * 63), ("mooncake48", mooncake_lengths(trace, 48, MAX_CONTEXT)),
            ("mooncake4", mooncake_lengths(trace, 4, MAX_CONTEXT, seed=1)), ("8Kx16", [8192] * 16),
            ("16Kx8", [16384] * 8), ("32Kx4", [32768] * 4)]


def ragged_points(device, dtype, read_bw, batches, blocks, heads=HEADS, reps=REPS, warmup=WARMUP) -> list[dict]:
    """Each batch x block: plan="splits" (choose_splits) and a RaggedPlan made once for the shapes (as an engine
    holds one), at the default PROGRAMS_PER_SM and at 4x; achieved KV bytes/s over the read bandwidth."""
    sms = sm_count(device)
    rows = []
    for name, lens in batches:
        for bs in blocks:
            q, k, v, table, lens_t = ragged_layout(lens, bs, dtype, device, heads=heads)
            n, width = table.shape
            kv_bytes = 2 * sum(lens) * heads * HEAD_DIM * k.element_size()
            common = {"batch": name, "block": bs, "rows": n, "tokens": sum(lens), "max_len": max(lens),
                      "kv_gib": kv_bytes / 2**30}
            base_out = None
            splits_us = None
            for label, pps in (("splits", None), ("ragged", PROGRAMS_PER_SM), ("ragged_x4", 4 * PROGRAMS_PER_SM)):
                row = {**common, "plan": label}
                if pps is None:
                    plan = "splits"
                    row["splits"] = choose_splits(n, heads, width * bs, sms)
                else:
                    plan = RaggedPlan(n, width, bs, heads, sms, device, programs_per_sm=pps)
                    plan.build(lens_t)
                    row.update(chunk=int(plan.chunk), items=int(plan.count), max_items=plan.max_items)
                try:
                    out, _ = paged_decode(q, k, v, table, lens_t, plan=plan)
                    t = timeit(lambda: paged_decode(q, k, v, table, lens_t, plan=plan), reps=reps, warmup=warmup)
                except Exception as e:  # a failing plan is reported, the others still run
                    rows.append({**row, "error": str(e)[:200]})
                    continue
                if base_out is None:
                    base_out = out
                splits_us = splits_us if pps else t * 1e6
                row.update(us=t * 1e6, ratio_to_read_bw=kv_bytes / t / read_bw,
                           max_abs_diff_vs_splits=float((out - base_out).abs().max()),
                           speedup_over_splits=splits_us / (t * 1e6) if splits_us else None)
                rows.append(row)
            del q, k, v, table, lens_t, base_out
    return rows


def ragged_main(args, out, device, dtype) -> dict:
    trace = Path(args.trace) if args.trace else next((t for t in FULL_TRACES if t.is_file()), SAMPLE_TRACE)
    batches = ragged_batches(args.smoke, trace)
    blocks = [16] if args.smoke else [16, 64, 256]
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
    cols = ["batch", "block", "rows", "tokens", "max_len", "kv_gib", "plan", "splits", "chunk", "items", "max_items",
            "us", "ratio_to_read_bw", "speedup_over_splits", "max_abs_diff_vs_splits"]
    errors = [r for r in rows if "error" in r]
    text = (f"# Paged decode attention: work plans on mixed-length batches on {describe_device(res['device'])}\n\n"
            f"versions: {json.dumps(res['device'])}\n\nread bandwidth: {lim['read_bytes_per_s'] / 1e12:.3f} TB/s; "
            f"{heads} heads, head dim {HEAD_DIM}, {dtype}, blocks at shuffled slots; Mooncake lengths from {trace.name} "
            f"(input + output / 2, at most {MAX_CONTEXT}); ratio = KV bytes / time / read bandwidth\n\n"
            "## ratio to the read bandwidth per plan\n\n"
            + md_table(list(by_point.values()), ["batch", "block", "rows", "max_len", "splits", "ragged", "ragged_x4",
                                                 "ragged_over_splits"])
            + "\n## every point\n\n" + md_table(rows, cols)
            + ("\n## errors\n\n" + md_table(errors, ["batch", "block", "plan", "error"], skip_errors=False)
               if errors else ""))
    print(text, flush=True)
    (out / "ragged.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "ragged.md").write_text(text)
    return res


if __name__ == "__main__":
    main()
