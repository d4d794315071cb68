"""The performance model: time per decode step (and prefill) for any (model, strategy, workload, hardware), from
shapes, bytes and FLOPs against calibrated efficiencies. Each strategy kind prices its own steps
(harness/strategies/, from the primitives of harness/costs.py); the calibration is harness/calibration.py's, the
checks against measured records harness/perfmodel_check.py's; memory per role lives in harness/memory.py.
Assumptions are in results/projected/README.md."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from harness.config import BenchConfig
from harness.costs import rates
from harness.memory import mean_context_lengths
from harness.preflight import check_fits, memory_by_role
from harness.strategies import spec_of
from harness.workload import prompt_lengths
from model.paged_attention import PLAN_BUILD, PLAN_BUILDS, SERVING_PLAN

if TYPE_CHECKING:
    from harness.calibration import Calibration


def predict_step(cfg: BenchConfig, cal: Calibration, eager: bool = False, graphed: bool | None = None) -> dict:
    """Predicted decode step: {'step_s', 'phases': {role: {phase: s}}, 'pool_busy_fraction', 'prefill_s'}.

    What the engines do (model/parallel/): static strategies replay each micro-batch's stage pass from a CUDA
    graph (TP collectives inside, at NCCL's in-graph time) and send pipeline messages eagerly; FA Pool replays
    its compute from graphs too, its messages always eager. `graphed` overrides strategy.cuda_graphs (a record
    says what ran); `eager` models engines without CUDA graphs or the paged kernel (every step eager, flash
    attention, phase timers). cal: harness/calibration.py's (default_calibration() is the committed one)."""
    b, bw, flops, links, gpn = rates(cfg, cal)
    spec = spec_of(cfg.strategy)
    step, phases, pool_busy = spec.decode_step(cfg, cal, links, bw, flops, b, mean_context_lengths(cfg), gpn, eager,
                                               graphed)
    prefill = predict_prefill(cfg, cal, bw, flops, links, gpn)
    return {"step_s": step, "phases": phases, "pool_busy_fraction": pool_busy, "prefill_s": prefill,
            "calibration": cal.source}


def predict_prefill(cfg, cal, bw, flops, links, gpn: int) -> float:
    """Prefill, chunk by chunk as the engines run it (strategy.prefill_chunk; whole prompts when 0). Per chunk and
    layer: GEMM and attention FLOPs at the GEMM efficiency (attention over the keys before the chunk, and causal
    over the chunk itself), plus the strategy's collectives and messages at NCCL's eager time (each kind's
    `prefill_s` says which). The LM head runs once, on each prompt's last position."""
    return spec_of(cfg.strategy).prefill_s(cfg, cal, bw, flops, links, gpn)


def serving_config(cfg: BenchConfig) -> BenchConfig:
    """cfg as the serving engines run it (model/parallel/static.py, fa_pool_serving.py): each kind says how
    (a pass is one micro-batch through the stages in turn; FA Pool's base and pool take turns and merge flat)."""
    return dataclasses.replace(cfg, strategy=spec_of(cfg.strategy).serving_config(cfg.strategy))


def predict_serving_step(cfg: BenchConfig, cal: Calibration, prefill_start, prefill_len, prefill_pooled, decode_ctx,
                         decode_pooled) -> float:
    """Seconds of one serving step (harness/serving/scheduler.StepPlan): a prefill pass over chunks of
    prefill_len tokens after prefill_start cached ones, then a decode pass over rows attending to decode_ctx
    tokens; the pooled flags say which rows' KV is in FA Pool's pool. cfg: serving_config's. Decode passes replay
    captured graphs where the engine captures them (one stage, not FA Pool); everything else runs eagerly.
    A replay pricing many steps of one config keeps a ServingPricer instead."""
    return ServingPricer(cfg, cal).step(prefill_start, prefill_len, prefill_pooled, decode_ctx, decode_pooled)


class ServingPricer:
    """predict_serving_step for one config (serving_config's) and calibration, with the rates computed once and
    a cache the strategy's spec keeps its per-row-count parts in."""

    def __init__(self, cfg: BenchConfig, cal: Calibration, table_tokens: int = 0, decode_plan: str | None = None,
                 prefill_graph_rows: int = 0, plan_build: str = PLAN_BUILD):
        """table_tokens: a row's block table holds this many tokens (the longest context a slot is sized for);
        0: the step's longest row's, rounded up to a block. decode_plan: the paged kernel's work plan of a decode
        pass ("ragged" or "splits"); None: the one the serving engines run (model/paged_attention.SERVING_PLAN).
        prefill_graph_rows: where decode passes are captured, small prefill passes of at least this many rows replay
        graphs of their token-count buckets (model/parallel/static.prefill_graph_bucket), through one mask, and take
        no host launch time; 0: every prefill pass runs eagerly. plan_build: how the engine built the ragged
        plan of a decode pass (model/paged_attention.PLAN_BUILDS; the serving engines' PLAN_BUILD by default)."""
        self.cfg, self.cal, self.table_tokens = cfg, cal, table_tokens
        if plan_build not in PLAN_BUILDS:
            raise ValueError(f"plan_build={plan_build!r}: expected one of {', '.join(PLAN_BUILDS)}")
        self.plan_build = plan_build
        self.prefill_graph_rows = prefill_graph_rows
        self.decode_plan = decode_plan or SERVING_PLAN
        self.b, self.bw, self.flops, self.links, self.gpn = rates(cfg, cal)
        self.spec = spec_of(cfg.strategy)
        self.graphed = self.spec.serving_graphed(cfg.strategy)
        self.cache: dict = {}

    def step(self, prefill_start, prefill_len, prefill_pooled, decode_ctx, decode_pooled, capture: bool = False) -> float:
        """Seconds of a step: its prefill pass, then its decode pass. capture: the decode pass is the first of its
        bucket (captured kinds), run eagerly and then captured (capture_s)."""
        t = host = 0.0
        if len(prefill_len):
            bucket = self.prefill_bucket(prefill_start, prefill_len)
            if bucket is None:  # eager: the device runs the pass's kernels as the host launches them
                host = self.spec.serving_prefill_host_s(self.cfg, self.cal)
            else:  # replayed from its bucket's graph: the bucket's padded rows, chunk width and keys
                rows, width, keys = bucket
                prefill_start, prefill_len, prefill_pooled = [keys - width] * rows, [width] * rows, [False] * rows
            t = max(host, self.spec.serving_prefill_s(self.cfg, self.cal, self.links, self.bw, self.flops, self.b,
                                                      self.gpn, prefill_start, prefill_len, prefill_pooled,
                                                      one_mask=bucket is not None))
        if len(decode_ctx):
            t = self.capture_s(t, host, self.decode_s(decode_ctx, decode_pooled)) if capture else \
                t + self.decode_s(decode_ctx, decode_pooled)
        return t

    def prefill_bucket(self, prefill_start, prefill_len) -> tuple[int, int, int] | None:
        """The token-count bucket (rows, chunk width, keys) whose graph the engine replays for this prefill pass, or
        None where the pass runs eagerly."""
        if not (self.graphed and self.prefill_graph_rows):
            return None
        from model.parallel.static import prefill_graph_bucket

        upto = max(int(a) + int(q) for a, q in zip(prefill_start, prefill_len))
        capacity = self.table_tokens or float("inf")  # no table size given: the bucket's keys always fit
        return prefill_graph_bucket(len(prefill_len), int(max(prefill_len)), upto, capacity,
                                    self.cfg.serving.max_batch, self.prefill_graph_rows)

    def buckets(self) -> list[int]:
        """Every captured decode bucket (none where the kind's serving decode passes are not captured)."""
        if not self.graphed:
            return []
        from model.parallel.static import decode_buckets

        return list(decode_buckets(self.cfg.serving.max_batch))

    def bucket(self, rows: int) -> int | None:
        """The captured bucket a decode pass of `rows` rows replays (model/parallel/static.decode_buckets); None
        where the kind's serving decode passes are not captured."""
        if not self.graphed:
            return None
        return next((b for b in self.buckets() if b >= rows), rows)

    def eager_decode_host_s(self) -> float:
        """The host's time to walk one decode pass eagerly (launching its kernels, or recording them in a capture):
        the eager engine's host time per layer (Calibration.eager_cpu_s_per_layer)."""
        return self.cfg.model.n_layers // self.cfg.strategy.pp * self.cal.eager_cpu_s_per_layer

    def capture_s(self, t: float, host: float, decode_s: float) -> float:
        """A step that meets a decode bucket for the first time (model/parallel/static._decode_captured), from the
        step's time t and its host's time host before the decode pass: the pass runs eagerly (its kernels as the host
        launches them, after what the device has queued), the host waits for the device, then captures the same
        pass (the host's walk again; the device idles: nothing of the capture runs)."""
        walk = self.eager_decode_host_s()
        return max(t + decode_s, host + walk) + walk

    def decode_s(self, decode_ctx, decode_pooled) -> float:
        """A decode pass over rows attending to decode_ctx tokens (decode_pooled: which are in FA Pool's pool)."""
        return self.spec.serving_decode_s(self, decode_ctx, decode_pooled)

    @property
    def by_totals(self) -> bool:
        """Whether decode_totals_s prices a decode pass (the kind's price needs only these totals)."""
        return self.spec.prices_decode_by_totals

    def decode_totals_s(self, rows: int, ctx_sum: int, ctx_max: int) -> float:
        """A decode pass over `rows` rows attending to ctx_sum tokens in all, ctx_max the longest (by_totals kinds)."""
        return self.spec.decode_totals_s(self, rows, ctx_sum, ctx_max)

    def longest_program_s(self, rows: int, ctx_max: int, ctx_sum: int) -> float:
        """The paged kernel's longest program for these rows (by_totals kinds: the attention's floor)."""
        return self.spec.longest_program_s(self, rows, ctx_max, ctx_sum)


# ----------------------------------------------------------------------------------------------------------
# Projected records (launcher=model).
# ----------------------------------------------------------------------------------------------------------
def project(cfg: BenchConfig, cfg_dict: dict, cal: Calibration, eager: bool = False):
    """A record of status ok (or oom when it cannot fit) marked env.source = 'projected'. Nothing runs."""
    from harness.measure import breakdown, compute_metrics
    from harness.record import RunRecord, run_id

    env = {"source": "projected", "hardware": cfg.hardware.name, "world_size": cfg.strategy.world_size,
           "device": cfg.hardware.device, "model": "harness/perfmodel.py"}
    too_big = check_fits(cfg)
    if too_big:
        return RunRecord(run_id=run_id(cfg_dict), status="oom", config=cfg_dict, error=f"projected: {too_big}", env=env)
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
        pool = spec_of(cfg.strategy).pool_ranks(cfg.strategy)
        util = {f"rank{cfg.strategy.world_size - pool + i}": pred["pool_busy_fraction"] for i in range(pool)}
    return RunRecord(run_id=run_id(cfg_dict), status="ok", config=cfg_dict, env=env, metrics=metrics,
                     step_times_ms=[t * 1e3 for t in steps], memory=memory,
                     breakdown={role: breakdown(ph) for role, ph in pred["phases"].items()},
                     pool_utilization=util, synthetic_kv=False)
