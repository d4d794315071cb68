"""Multi-GPU benchmark: every strategy on this machine's GPUs, each against its roofline, in one job.

    python -m harness.bench_multi --out results/measured/<device>-x4      # on a machine with 4 GPUs
    python -m harness.bench_multi --smoke --out /tmp/x                     # tiny model, 2 CPU ranks (tests)

1. Limits, measured here: the read bandwidth of every GPU (the slowest counts) and NCCL's time per operation
   (all-reduce, all-gather and all-to-all over 2 and 4 ranks, a point-to-point message between 2), eager and inside a CUDA
   graph, at sizes 4 KiB-64 MiB per rank -> limits.json.
2. The runs, each through `fapool-bench` (its own processes, its failures a failed record): the paper model in
   bf16 with synthetic KV, at 8K b16 and at contexts 8K, 16K, 32K with the batch that fills half of one GPU's
   memory with KV (the reference's, and FA Pool 2+1's pool rank, hold all of it); strategies reference (1 GPU),
   tp2, tp1_pp2, tp4, tp2_pp2, tp1_pp4 (each pipeline also with twice the micro-batches), DCP (TP2 and TP4 with the
   KV split over 2 or 4 ranks), FA Pool 1+1, 2+2, 1+3, 2+1
   (threshold below the context: every sequence in the pool; one micro-batch) and FA Pool 2+2 with two
   micro-batches overlapping pool and base (async_overlap). Each run is an experiment preset,
   conf/experiment/bench_multi/<run>.yaml (`fapool-bench experiment=bench_multi/<run>` runs one alone); its
   family (reference, static, dcp, fa_pool) is its strategy's kind.
   `--prefill-chunk N` runs the same points with a real prefill in chunks of N tokens instead of synthetic KV
   (TTFT and the paper's TPS in the records and the table; records tagged `_prefill`).
3. Each ok record gets its roofline (harness/roofline.py) written into it; the table (bench_multi.md/json)
   gives TPOT, decode TPS per GPU, TPOT / roofline, and the speed-up over the best static TP x PP at equal GPUs.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.bench_gpu import limits
from harness.benchlib import bench_setup, describe_device, md_table, timeit_fixed
from harness.config import from_dict, register_configs
from harness.launch import forkserver, free_port
from harness.measure import DECODE_RANGE, PREFILL_RANGE, TIMELINE_FIELDS, profile_summary, trace_events
from harness.record import RunRecord, device_environment, write_record
from harness.roofline import roofline
from model.config import PRESETS
from model.parallel.tp import all_gather_single

KiB = 1024
SIZES = [4 * KiB * 4**i for i in range(8)]  # 4 KiB .. 64 MiB per rank
SMOKE_SIZES = [4 * KiB, 64 * KiB]
STEPS = 16  # output tokens per sequence: 15 timed decode steps


# -- 1. NCCL per operation ----------------------------------------------------------------------------------
def _time_op(fn, graphed: bool, reps: int = 20) -> float:
    """Seconds per call of fn: `reps` calls eagerly, or captured in one CUDA graph and replayed; median of 5."""
    cuda = torch.cuda.is_available()
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: communicators and NCCL's buffers exist before capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
    else:
        for _ in range(3):
            fn()
    run = lambda: [fn() for _ in range(reps)]  # noqa: E731
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            run()
        run = graph.replay
    return timeit_fixed(run, reps=5, warmup=2) / reps  # every rank replays as often: the collectives pair up


def _calibrate_rank(rank, world, port, sizes, path):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=device if cuda else None)
    groups = {g: dist.new_group(list(range(g))) for g in (2, 4) if g <= world}
    dtype = torch.bfloat16 if cuda else torch.float32
    modes = ("graph", "eager") if cuda else ("eager",)
    res = {mode: {"all_reduce": {}, "all_gather": {}, "all_to_all": {}, "p2p": {}} for mode in modes}
    for g, group in groups.items():
        for size in sizes:
            buf = torch.zeros(size // dtype.itemsize, dtype=dtype, device=device)
            gathered = torch.zeros(g * buf.numel(), dtype=dtype, device=device)
            scattered = torch.zeros_like(gathered)  # all-to-all: `size` bytes to and from each peer
            ops = {"all_reduce": lambda: dist.all_reduce(buf, group=group),
                   "all_gather": lambda: all_gather_single(gathered, buf, group=group),
                   "all_to_all": lambda: dist.all_to_all_single(scattered, gathered, group=group)}
            if g == 2:  # one message from rank 0 to rank 1, as the pipeline and the pool send them
                peer = 1 - rank
                kind = dist.isend if rank == 0 else dist.irecv
                ops["p2p"] = lambda: [w.wait() for w in dist.batch_isend_irecv([dist.P2POp(kind, buf, peer, group)])]
            for op, fn in ops.items():
                for mode in modes:
                    if rank < g:
                        res[mode][op].setdefault(str(g), []).append([size, _time_op(fn, mode == "graph")])
                    dist.barrier()
    if rank == 0:
        Path(path).write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


def calibrate_nccl(world: int, sizes: list[int], out: Path) -> dict:
    path = out / "nccl_calibration.json"
    forkserver()  # its ranks start as the local launcher's do: forked from a process that has torch imported
    mp.start_processes(_calibrate_rank, args=(world, free_port(), sizes, str(path)), nprocs=world, join=True,
                       start_method="forkserver")
    return json.loads(path.read_text())


# -- 2. the runs -------------------------------------------------------------------------------------------------
RUN_PRESETS = Path(__file__).resolve().parent.parent / "conf" / "experiment" / "bench_multi"
FAMILIES = ("reference", "static", "dcp", "fa_pool")  # strategy kinds, in the order the runs of a point go
STATIC = ("reference", "static")  # the kinds a speed-up is measured against: plain TP x PP


@functools.lru_cache(maxsize=1)
def catalog() -> dict[str, dict]:
    """Every run the benchmark knows: the experiment presets under conf/experiment/bench_multi/ (one per run, named
    as the run), each with its strategy's kind and GPU count as Hydra composes them; ordered by GPUs, then family
    (FAMILIES, other kinds after them), then name."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    runs = {}
    with initialize_config_dir(config_dir=str(RUN_PRESETS.parent.parent), version_base="1.3"):
        for path in sorted(RUN_PRESETS.glob("*.yaml")):
            strategy = compose(config_name="config", overrides=[f"experiment=bench_multi/{path.stem}"]).strategy
            runs[path.stem] = {"kind": strategy.kind, "gpus": int(OmegaConf.select(strategy, "world_size"))}
    rank = {kind: i for i, kind in enumerate(FAMILIES)}  # a kind not listed goes after them
    return dict(sorted(runs.items(), key=lambda kv: (kv[1]["gpus"], rank.get(kv[1]["kind"], len(rank)), kv[0])))


def strategies(gpus: int, smoke: bool) -> dict:
    """name -> fapool-bench overrides of the runs that fit on `gpus`: the run's experiment preset and, for FA Pool,
    nodes of this machine's GPUs (one node: no second merge level) and, in smoke runs, the tiny model's threshold
    and block size in place of the paper's."""
    small_pool = ["strategy.pool.threshold=16", "strategy.pool.block_size=16"] if smoke else []
    return {name: [f"experiment=bench_multi/{name}",
                   *([f"strategy.pool.gpus_per_node={gpus}", *small_pool] if run["kind"] == "fa_pool" else [])]
            for name, run in catalog().items() if run["gpus"] <= gpus}


def points(smoke: bool, gpu_bytes: int) -> list[tuple[int, int]]:
    """(context, batch): 8K at batch 16, then each context at the batch whose KV fills half of one GPU."""
    if smoke:
        return [(48, 4)]
    paper = PRESETS["paper"]
    token_bytes = paper.n_layers * 2 * paper.hidden * 2  # layers x (K, V) x hidden x bf16
    half = [(n, max(4, int(gpu_bytes * 0.5 / (token_bytes * n)) // 4 * 4 + 4)) for n in (8192, 16384, 32768)]
    return [(8192, 16)] + half


def chosen_points(spec: str, smoke: bool, gpu_bytes: int) -> list[tuple[int, int, set]]:
    """--points: CONTEXTxBATCH[:name+name...], BATCH a number or `half` (the batch whose KV fills half a GPU)."""
    if not spec:
        return [(c, b, set()) for c, b in points(smoke, gpu_bytes)]
    half = dict(points(False, gpu_bytes)[1:])
    out = []
    for item in spec.split(","):
        point, _, names = item.partition(":")
        context, batch = point.split("x")
        out.append((int(context), half[int(context)] if batch == "half" else int(batch), set(filter(None, names.split("+")))))
    return out


def run_point(name, overrides, context, batch, smoke, out: Path, timeout_s: int, prefill_chunk: int = 0,
              trace: bool = False, profile_prefill: bool = False) -> dict:
    """One fapool-bench run. prefill_chunk = 0: synthetic KV (decode only); > 0: a real prefill in chunks of that
    many tokens (TTFT and the paper's TPS in the record; tag suffix `_prefill`), its prefill profiled in one more
    generation with profile_prefill."""
    # sdpa: the fused kernels for prefill (decode steps run the paged kernel whatever the backend); math's fp32
    # T x T scores of a 2048-token chunk at batch 140 need 35 GiB
    model = ["model=tiny", "hardware=cpu", "hardware.dtype=float32"] if smoke else \
        ["model=paper", "hardware=cuda", "attention_backend=sdpa"]
    point = [f"workload=len{8192 if smoke else context}", f"workload.prompt_lens=[{context}]",
             f"workload.batch_size={batch}", f"workload.output_tokens={STEPS}", "workload.warmup_steps=2",
             "check_reference=false"]
    if prefill_chunk:
        point += ["workload.synthetic_kv=false", f"strategy.prefill_chunk={prefill_chunk}",
                  *(["strategy.kv_block=16"] if smoke else [])]
    else:
        point.append("workload.synthetic_kv=true")
    tag = f"{name}_L{context}_B{batch}" + ("_prefill" if prefill_chunk else "")
    rdir = out / "records" / tag
    cmd = [sys.executable, "-m", "harness.app", "hydra.mode=RUN", f"hydra.run.dir={tempfile.gettempdir()}/hydra/{tag}",
           f"results_dir={rdir}", f"launcher.timeout_s={timeout_s}", *model, *overrides, *point,
           # decode steps profiled where the KV is synthetic: with a real prefill that pass would cost one more whole
           # prefill per run; the prefill profiled where asked (one more generation)
           f"profile={'false' if prefill_chunk else 'true'}",
           f"profile_prefill={str(bool(prefill_chunk) and profile_prefill).lower()}",
           f"profile_trace={str(trace and (not prefill_chunk or profile_prefill)).lower()}"]
    t0 = time.time()
    with open(out / "logs" / f"{tag}.txt", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s + 60, check=False)
    result = rdir / "result.json"
    rec = json.loads(result.read_text()) if result.exists() else {"status": "failed", "error": "no record"}
    return {"tag": tag, "name": name, "context": context, "batch": batch, "path": str(result),
            "wall_s": time.time() - t0, "record": rec}


def roofline_comm(limits: dict) -> dict:
    """The NCCL calibration a roofline uses: in-graph times (every strategy captures its collectives), eager where
    the machine could not capture (CPU smoke runs)."""
    return limits["comm"].get("graph", limits["comm"]["eager"])


def attach_roofline(run: dict, read_bw: float, comm: dict) -> None:
    """An ok run's roofline, written into its record (atomically, harness/record.write_record)."""
    if run["record"].get("status") != "ok":
        return
    rec = RunRecord.from_dict(run["record"])
    rec.roofline = roofline(from_dict(rec.config), run["record"], read_bw, comm)
    write_record(rec, Path(run["path"]).parent)
    run["record"] = json.loads(rec.to_json())


def family(record: dict) -> str | None:
    """The run's strategy kind (reference, static, dcp, fa_pool), from its record's config."""
    return ((record.get("config") or {}).get("strategy") or {}).get("kind")


def table_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        rec = r["record"]
        m, roof = rec.get("metrics") or {}, rec.get("roofline") or {}
        gpus = m.get("num_gpus") or rec.get("config", {}).get("strategy", {}).get("world_size")
        rows.append({"run": r["name"], "tag": r["tag"], "kind": family(rec), "context": r["context"],
                     "batch": r["batch"], "gpus": gpus,
                     "status": rec.get("status"), "ttft_ms": m.get("ttft_ms"), "tps_per_gpu": m.get("tps_per_gpu"),
                     "tpot_ms": m.get("mean_tpot_ms"), "median_tpot_ms": m.get("median_tpot_ms"),
                     "decode_tps_per_gpu": (m["decode_tps"] / gpus) if m.get("decode_tps") else None,
                     "roofline_ms": roof.get("step_ms"), "ratio": roof.get("ratio"),
                     "note": (rec.get("error") or "")[:120]})
    for row in rows:  # the best static strategy at the same point and GPU count
        static = [o["tpot_ms"] for o in rows if (o["context"], o["batch"], o["gpus"]) == (row["context"], row["batch"], row["gpus"])
                  and o["tpot_ms"] and o["kind"] in STATIC]
        row["speedup_vs_best_static"] = min(static) / row["tpot_ms"] if static and row["tpot_ms"] else None
    return rows


def main(argv=None):
    def extra(ap):
        ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all; smoke: 2 CPU ranks)")
        ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
        ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
        ap.add_argument("--points", default="", help="comma-separated CONTEXTxBATCH[:run+run], BATCH a number or half "
                                                     "(default: 8K b16, then 8K, 16K, 32K at half memory)")
        ap.add_argument("--prefill-chunk", type=int, default=0, help="0: synthetic KV (decode only); N: a real "
                        "prefill in chunks of N tokens (whole KV blocks), with TTFT and TPS")
        ap.add_argument("--trace", action="store_true", help="also each profiled run's Chrome traces (records/<run>/traces/)")
        ap.add_argument("--profile-prefill", action="store_true", help="with --prefill-chunk: each run's prefill "
                        "profiled in one more generation (profile.md's second table)")
        ap.add_argument("--rebuild", action="store_true", help="measure nothing: the tables again from OUT's "
                        "records/ and limits.json (e.g. after a call ran out of time before writing them)")

    args, out, device, dtype = bench_setup(__doc__, argv, extra)
    if args.rebuild:
        return rebuild(out)
    smoke = args.smoke
    gpus = args.gpus or (2 if smoke or device.type != "cuda" else torch.cuda.device_count())
    (out / "logs").mkdir(exist_ok=True)
    res = {"device": device_environment(device), "gpus": gpus}
    reads = []
    for i in range(gpus if device.type == "cuda" else 1):
        if device.type == "cuda":
            torch.cuda.set_device(i)  # limits() times on the current device
        reads.append(limits(torch.device("cuda", i) if device.type == "cuda" else device, dtype, smoke)["read_bytes_per_s"])
    res["read_bytes_per_s"] = {"per_gpu": reads, "used": min(reads)}
    res["comm"] = calibrate_nccl(gpus, SMOKE_SIZES if smoke else SIZES, out)
    comm = roofline_comm(res)
    (out / "limits.json").write_text(json.dumps(res, indent=1))
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 0
    only = set(filter(None, args.only.split(",")))
    runs = []
    for context, batch, names in chosen_points(args.points, smoke, gpu_bytes):
        for name, overrides in strategies(gpus, smoke).items():
            if (only and name not in only) or (names and name not in names):
                continue
            run = run_point(name, overrides, context, batch, smoke, out, args.timeout, args.prefill_chunk, args.trace,
                            args.profile_prefill)
            attach_roofline(run, res["read_bytes_per_s"]["used"], comm)
            runs.append(run)
            rec = run["record"]
            print(f"{run['tag']}: {rec.get('status')} {rec.get('metrics', {}).get('mean_tpot_ms', '')} ms "
                  f"ratio {rec.get('roofline', {}).get('ratio', '')} ({run['wall_s']:.0f} s)", flush=True)
    write_tables(out, res, runs, prefill=bool(args.prefill_chunk))


def write_tables(out: Path, res: dict, runs: list[dict], prefill: bool) -> None:
    rows = table_rows(runs)
    (out / "bench_multi.json").write_text(json.dumps({"limits": res, "rows": rows}, indent=1, default=str))
    cols = ["run", "context", "batch", "gpus", "status", *(["ttft_ms", "tps_per_gpu"] if prefill else []),
            "tpot_ms", "median_tpot_ms", "decode_tps_per_gpu", "roofline_ms", "ratio", "speedup_vs_best_static", "note"]
    device = {"nccl": res.get("nccl"), **res["device"]}  # limits.json from before the device carried NCCL's version
    text = (f"# Multi-GPU benchmark on {describe_device(device)}, x{res['gpus']}\n\nread bandwidth used: "
            f"{res['read_bytes_per_s']['used'] / 1e12:.2f} TB/s\n\n" + md_table(rows, cols))
    (out / "bench_multi.md").write_text(text + "\n")
    (out / "profile.md").write_text(profile_table(runs) + "\n\n" + profile_table(runs, "profile_prefill") + "\n")
    print(text)


def rebuild(out: Path) -> None:
    """The tables from OUT/records/*/result.json and OUT/limits.json, rooflines attached again, and each rank's
    profile summarized again from its trace where the run kept one (records/<run>/traces/)."""
    res = json.loads((out / "limits.json").read_text())
    comm = roofline_comm(res)
    runs = []
    for path in sorted((out / "records").glob("*/result.json")):
        rec = json.loads(path.read_text())
        w = (rec.get("config") or {}).get("workload") or {}
        for rank in rec.get("ranks") or []:  # summarize kept traces again (with the code of now)
            for prefix, phase, key, steps in (("", DECODE_RANGE, "profile", w["output_tokens"] - 1),
                                              ("prefill_", PREFILL_RANGE, "profile_prefill", 1)):
                trace = path.parent / "traces" / f"{prefix}rank{rank['rank']}.json.gz"
                if trace.exists():
                    rank[key] = profile_summary(trace_events(trace, phase), steps)
        run = {"tag": path.parent.name, "name": path.parent.name.split("_L")[0], "context": max(w["prompt_lens"]),
               "batch": w["batch_size"], "path": str(path), "wall_s": None, "record": rec}
        attach_roofline(run, res["read_bytes_per_s"]["used"], comm)
        runs.append(run)
    order = list(strategies(4, False))  # the order the job runs them in
    runs.sort(key=lambda r: (r["context"], r["batch"], order.index(r["name"]) if r["name"] in order else len(order)))
    write_tables(out, res, runs, prefill=any(not r["record"].get("synthetic_kv", True) for r in runs))


# harness/measure.timeline_summary's fields as profile.md names them
PROFILE_TIMELINE_COLUMNS = {"window_ms": "window ms", "compute_ms": "compute ms", "nccl_only_ms": "NCCL only ms",
                            "idle_ms": "idle ms", "compute_share": "compute share"}


def profile_table(runs: list[dict], key: str = "profile") -> str:
    """Per run and role (the role's first rank): device time per decode step (key `profile`) or per prefill
    (`profile_prefill`) by kind of kernel, and where the wall time went on that GPU
    (harness/measure.timeline_summary), from the profiled phase."""
    title = ("# Device time per decode step (torch.profiler over the decode steps of one more generation per run)"
             if key == "profile" else "# Device time of the prefill (torch.profiler over the prefill of one more "
             "generation per run; a window is the whole prefill)")
    lines = [title, "",
             "kernels by kind (NCCL includes a receive spinning on its peer); then the step's window on this GPU: "
             "compute = the union of non-NCCL work, NCCL only = transfers or waits with no compute beside them, "
             "idle = nothing issued.", "",
             ""]
    rows = []
    for r in runs:
        seen = set()
        for rank in sorted(r["record"].get("ranks", []), key=lambda x: x["rank"]):
            prof = rank.get(key)
            if not prof or rank["role"] in seen:
                continue
            seen.add(rank["role"])
            tl = prof.get("timeline") or {}
            steps = tl.get("steps") or 1  # older records: the whole profiled generation, prefill included
            device_ms = {k: v * 1e3 / steps for k, v in prof["device_s"].items()}
            rows.append({"run": r["tag"], "role": rank["role"], "rank": rank["rank"],
                         "NCCL ms": device_ms["communication"], "attention ms": device_ms["attention"],
                         "gemm ms": device_ms["gemm"], "other ms": device_ms["other"],
                         **{PROFILE_TIMELINE_COLUMNS[k]: tl.get(k) for k in TIMELINE_FIELDS},
                         "top kernel": prof["top_kernels"][0]["name"][:40] if prof["top_kernels"] else ""})
    cols = ["run", "role", "rank", "NCCL ms", "attention ms", "gemm ms", "other ms",
            *(PROFILE_TIMELINE_COLUMNS[k] for k in TIMELINE_FIELDS), "top kernel"]
    lines.append(md_table(rows, cols, floatfmt=".3f").rstrip("\n"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
