"""Serving on one device: a measured trace replay at several request rates, its steps timed again alone, and the
scheduler's host time per step.

    python -m harness.bench_serving --out DIR                        # on a GPU: the paper model, Mooncake sample
    python -m harness.bench_serving --out DIR --smoke                # the tiny model on the CPU (tests)

For each rate it replays the trace (one record per rate under DIR/records/, with requests.csv and the step log), then
takes a sample of the highest rate's steps and runs each again alone, back to back (the same passes on the same
engine, its captured graph where the replay had one): a decode-only step against its time inside the replay, and
a mixed step against its prefill and decode passes each timed alone. Each decode step's roofline is its weight and
KV bytes over the read bandwidth measured in the same run. With --profile (a GPU) each sampled decode step also runs
a few times more under torch.profiler, after its timing: its device time by kind of kernel and its top kernels (the
JSON's `kernels`); so does each sampled mixed step's prefill pass (`prefill <kind> ms`). Writes
DIR/bench_serving.json and bench_serving.md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.bench_gpu import limits
from harness.benchlib import describe_device, timeit
from harness.config import load, register_configs, validate
from harness.measure import PhaseTimer
from harness.record import device_environment
from harness.runner import build_engine
from harness.serving.replay import replay, warmup_requests
from harness.serving.run import STEPS_FILE, write_serving_record
from harness.traces import load_trace

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
GPU = ["model=paper", "hardware=cuda", "attention_backend=sdpa", "strategy=reference", "workload=mooncake_conversation",
       "serving.max_batch=64", "serving.token_budget=2112", "serving.prefill_chunk=2048", "serving.block_size=64",
       "check_reference=false"]
SMOKE = ["workload=tiny_mooncake", "serving.max_batch=8", "check_reference=false"]


def config(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        raw = compose(config_name="config", overrides=overrides)
    cfg = load(raw)
    validate(cfg)
    return cfg, OmegaConf.to_container(raw, resolve=True)


def device_idle(steps: pd.DataFrame) -> dict:
    """How long the device waited on the host between steps (CUDA events: a step's end to the next one's start),
    over the steps that followed another at once (not after waiting for an arrival, when the device idles because
    there is no work): the median gap and the share of the device's time those gaps take."""
    if "gap_ms" not in steps:
        return {}
    back_to_back = steps[~steps.waited_for_arrival.astype(bool) & steps.gap_ms.notna()]
    busy = back_to_back.device_ms.sum() + back_to_back.gap_ms.sum()
    return {"gap ms p50": back_to_back.gap_ms.median(), "device idle on host %": 100 * back_to_back.gap_ms.sum() / busy
            if busy else float("nan")}


def alone(engine, passes, updates, migrations, reps: int) -> float:
    """Median seconds of one step's passes run again back to back (their KV writes land where they did)."""
    return timeit(lambda: engine.serve_step(passes, updates[:0], migrations[:0]), reps=reps, warmup=2)


def captured(engine, passes, updates, migrations, reps: int) -> tuple[float, str]:
    """(median seconds, "") of the passes replayed from one CUDA graph captured at their exact shape, or (nan, why
    not). A token-count bucket pads a pass up to its size, so this is the most that capturing prefill chunks by
    buckets could gain over running them eagerly."""
    run = lambda: engine.serve_step(passes, updates[:0], migrations[:0])  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # capture's warm-up, on a side stream as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
    except RuntimeError as err:
        torch.cuda.synchronize()
        return float("nan"), str(err).splitlines()[0]
    seconds = timeit(graph.replay, reps=reps, warmup=2)
    del graph
    return seconds, ""


def kernels_by_name(engine, passes, updates, migrations, reps: int) -> dict:
    """Where one step's device time goes: the passes run `reps` times more under torch.profiler (apart from the
    timed runs, so the profiler does not touch what they measure), per step in ms by kind of kernel and by kernel."""
    from harness.measure import device_events, kernel_summary

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
    with prof:
        for _ in range(reps):
            engine.serve_step(passes, updates[:0], migrations[:0])
        torch.cuda.synchronize()
    summary = kernel_summary(device_events(prof), top=12)
    return {"by_kind_ms": {k: t * 1e3 / reps for k, t in summary["device_s"].items()},
            "top_kernels": [{"name": k["name"], "ms": k["device_s"] * 1e3 / reps, "calls": k["calls"] / reps}
                            for k in summary["top_kernels"]]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rates", default="1,2,4,8", help="requests per second, comma-separated")
    ap.add_argument("--requests", type=int, default=80, help="the trace window: its first N requests")
    ap.add_argument("--sample", type=int, default=12, help="steps of each kind timed alone")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU")
    ap.add_argument("--profile", action="store_true",
                    help="on a GPU, also take each sampled decode step, and each sampled mixed step's prefill pass, "
                         "apart by kernel (torch.profiler, after its timing)")
    ap.add_argument("overrides", nargs="*", help="more config overrides (key=value)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = (SMOKE if args.smoke else GPU) + [f"workload.trace.first_n={args.requests}"] + args.overrides
    cfg, _ = config(base)
    device = torch.device("cuda", 0) if cfg.hardware.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = tempfile.mktemp(prefix="fapool_bench_serving_")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    info = device_environment(device)
    lim = limits(device, getattr(torch, cfg.hardware.dtype), smoke=args.smoke)
    engine = build_engine(cfg, 0, 1, device, PhaseTimer(device, enabled=False))
    requests = load_trace(cfg.workload.trace)
    replay(cfg, engine, 0, device, warmup_requests(requests, cfg.serving.warmup_requests), warmup=True,
           shaped_by=requests)
    rows, kept = [], {}
    rates = [float(r) for r in args.rates.split(",")]
    for i, rate in enumerate(rates):
        cfg_r, cfg_dict = config(base + [f"workload.trace.rate={rate}"])
        engine.reset_measurements()
        last = i == len(rates) - 1
        keep = (lambda step, *a: kept.__setitem__(step, a)) if last else None
        result = replay(cfg_r, engine, 0, device, on_step=keep)
        rec_dir = out / "records" / f"rate_{rate:g}"
        report = engine.report() | {"rank": 0, "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
                                    "memory_source": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "none"}
        rec = write_serving_record(cfg_r, cfg_dict, result, [report], 1, backend, rec_dir)
        m = rec.metrics
        steps = pd.read_csv(rec_dir / STEPS_FILE)
        rows.append({"rate": rate, "offered req/s": m["offered_rate"], "completed": m["completed"], "refused": m["refused"],
                     "TTFT p50 ms": m["ttft_ms_p50"], "TTFT p99 ms": m["ttft_ms_p99"], "TPOT p50 ms": m["tpot_ms_p50"],
                     "TPOT p99 ms": m["tpot_ms_p99"], "goodput req/s": m["goodput"], "out tok/s": m["output_tokens_per_s"],
                     "steps": m["steps"], "host ms p50": steps.host_ms.median(), "host ms p99": steps.host_ms.quantile(0.99),
                     "decode passes replayed": int(steps.replayed.sum()), "batch mean": m["batch_mean"],
                     "running max": int(steps.running.max())} | device_idle(steps))
        if last:
            last_steps = steps
    # steps of the last replay, timed alone: decode-only ones against the replay, mixed ones against their parts
    per_token_kv = 2 * cfg.model.n_layers * cfg.model.hidden * torch.finfo(getattr(torch, cfg.hardware.dtype)).bits // 8
    weight_bytes = engine.report()["weight_bytes"]
    # on a GPU a bucket's first decode pass runs eagerly and is captured: those steps are left out
    graphed = last_steps.replayed > 0 if device.type == "cuda" else last_steps.replayed == 0
    decode_only = last_steps[(last_steps.prefill_tokens == 0) & (last_steps.decode_rows > 0) & graphed]
    mixed = last_steps[(last_steps.prefill_tokens > 0) & (last_steps.decode_rows > 0)]
    pick = lambda d: d.iloc[np.linspace(0, len(d) - 1, min(args.sample, len(d))).astype(int)] if len(d) else d  # noqa: E731
    compared = []
    device_ms = "device_ms" if "device_ms" in last_steps else None
    for kind, chosen in (("decode", pick(decode_only)), ("mixed", pick(mixed))):
        for _, s in chosen.iterrows():
            passes, updates, migrations = kept[int(s.step)]
            in_replay = (s[device_ms] if device_ms else (s.end - s.start) * 1e3)
            row = {"kind": kind, "step": int(s.step), "decode rows": int(s.decode_rows), "prefill tokens": int(s.prefill_tokens),
                   "in replay ms": in_replay}
            if kind == "decode":
                t = alone(engine, passes, updates, migrations, reps=10) * 1e3
                context = int((passes[-1][0].start + 1).sum())
                roof = (weight_bytes + context * per_token_kv) / lim["read_bytes_per_s"] * 1e3
                row |= {"alone ms": t, "replay / alone": in_replay / t, "roofline ms": roof, "alone / roofline": t / roof,
                        "context tokens": context}
                if args.profile and device.type == "cuda":
                    try:
                        kernels = kernels_by_name(engine, passes, updates, migrations, reps=5)
                    except Exception as err:  # the profile is an extra: its failure is a column, the run goes on
                        row["profile error"] = f"{type(err).__name__}: {err}"[:200]
                    else:
                        row |= {f"{k} ms": v for k, v in kernels["by_kind_ms"].items()} | \
                            {"kernels": kernels["top_kernels"]}
            else:
                parts = [alone(engine, [p], updates, migrations, reps=5) * 1e3 for p in passes]
                row |= {"alone ms": sum(parts), "prefill pass ms": parts[0], "decode pass ms": parts[-1],
                        "replay / alone": in_replay / sum(parts)}
                if device.type == "cuda":  # the prefill pass eagerly, and from a graph of its exact shape
                    engine.capture_prefill = False
                    eager_ms = alone(engine, passes[:1], updates, migrations, reps=5) * 1e3
                    graph_s, why = captured(engine, passes[:1], updates, migrations, reps=5)
                    engine.capture_prefill = True
                    row |= {"prefill eager ms": eager_ms, "prefill captured ms": graph_s * 1e3,
                            "eager / captured": eager_ms / (graph_s * 1e3), "served / eager": parts[0] / eager_ms}
                    if why:
                        row["not captured"] = why
                if args.profile and device.type == "cuda":  # the prefill pass alone, as served
                    try:
                        kernels = kernels_by_name(engine, passes[:1], updates, migrations, reps=3)
                    except Exception as err:
                        row["profile error"] = f"{type(err).__name__}: {err}"[:200]
                    else:
                        row |= {f"prefill {k} ms": v for k, v in kernels["by_kind_ms"].items()} | \
                            {"kernels": kernels["top_kernels"]}
            compared.append(row)
    table, steps_table = pd.DataFrame(rows), pd.DataFrame(compared)
    result = {"device": info, "limits": lim, "config": base, "replays": rows, "steps_alone": compared,
              "trace": requests.summary()}
    (out / "bench_serving.json").write_text(json.dumps(result, indent=1, default=str))
    md = [f"# Serving on {describe_device(info)}", "", f"device: {json.dumps(info)}", "",
          f"Limits measured in this run: read {lim['read_bytes_per_s'] / 1e12:.2f} TB/s, GEMM "
          f"{lim['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s. Config: {' '.join(base)}", "",
          "## Replays by rate (SLO: TTFT <= %g ms, TPOT <= %g ms)" % (cfg.serving.slo_ttft_ms, cfg.serving.slo_tpot_ms), "",
          table.to_markdown(index=False, floatfmt=".4g"), "",
          "## Steps of the last replay timed alone (decode: the same pass back to back; mixed: its passes apart)", "",
          steps_table.drop(columns="kernels", errors="ignore").to_markdown(index=False, floatfmt=".4g")
          if len(steps_table) else "(none)", ""]
    for kind in ("decode", "mixed"):
        d = steps_table[steps_table.kind == kind] if len(steps_table) else steps_table
        if len(d):
            md.append(f"{kind}: replay / alone median {d['replay / alone'].median():.3f}, max {d['replay / alone'].max():.3f}")
        if kind == "mixed" and len(d) and "eager / captured" in d:
            md.append(f"prefill passes, eager / captured at their exact shape: median {d['eager / captured'].median():.3f}, "
                      f"max {d['eager / captured'].max():.3f}; as served (a token-count bucket's graph where the pass "
                      f"is small) / eager: median {d['served / eager'].median():.3f}, max {d['served / eager'].max():.3f}")
    (out / "bench_serving.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    engine.release_graphs()
    dist.destroy_process_group()
    os.path.exists(store) and os.remove(store)


if __name__ == "__main__":
    main()
