"""The config schema: structured-config dataclasses behind every group in conf/, and validation.

OmegaConf refuses unknown keys and wrong types against these schemas; `validate()` refuses
combinations that are well-typed but cannot run, before anything is launched.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from harness.memory import check_fits
from harness.traces import TraceConfig, TraceError, load_trace
from model.config import ModelConfig

STRATEGY_KINDS = ("reference", "static", "dcp", "fa_pool")
SCHEDULES = ("continuous", "gpipe")  # the pipeline schedules of model/parallel/static.py
FAULTS = ("none", "raise", "kill", "hang", "wrong_token", "perturb_weight")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field, the value and the fix."""


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def at_least(group: str, obj, low, *names: str) -> None:
    """Each of obj's fields `names` is >= low (NaN is refused too)."""
    for n in names:
        v = getattr(obj, n)
        need(v >= low, f"{group}.{n}={v} must be >= {low}")


def above(group: str, obj, low, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        need(v > low, f"{group}.{n}={v} must be > {low}")


@dataclass
class PoolConfig:
    size: int = 0  # attention-pool ranks in the world (beyond the base group)
    max_size: int = 32  # cap on the ranks one sequence may use (paper: 32)
    threshold: int = 4096  # sequences with more context tokens than this attend in the pool
    block_size: int = 256  # tokens per KV block in the pool
    policy: str = "proportional"  # pool ranks per sequence: proportional (ceil(len / tokens_per_rank)) | all
    tokens_per_rank: int = 4096  # the proportional policy's tokens per pool rank
    hierarchical: bool = True  # merge partials within a node, then across nodes; False = flat
    async_overlap: bool = True  # overlap pool attention of one micro-batch with base work of another
    # with async_overlap: micro-batch m of layer l + 1 starts when m of layer l finished, not after all of layer l
    # (the pool never waits for a whole layer of base work); CPU-tested; off until the GPU test of its tokens
    # (tests/test_gpu_strategies.py) has passed
    wavefront: bool = False
    # the prefill's rows in this many consecutive groups (at most one per row), taken through each chunk's layers in
    # wavefront order: the pool attends one group's layer while the base runs another's dense work (1: one group,
    # base and pool take turns); 2 by default: more groups stopped lowering the measured TTFT
    prefill_micro_batches: int = 2
    gpus_per_node: int = 8  # ranks per node, for the hierarchical reduction (tests pretend 2)
    kv_memory_fraction: float = 0.9  # of a pool GPU's free memory preallocated as KV blocks (capped at what the batch can use)

    def __post_init__(self):
        g = "strategy.pool"
        at_least(g, self, 0, "size")
        at_least(g, self, 1, "max_size", "gpus_per_node", "prefill_micro_batches")
        above(g, self, 0, "threshold", "block_size", "tokens_per_rank")
        need(self.size <= self.max_size, f"strategy.pool.size={self.size} exceeds strategy.pool.max_size={self.max_size}")
        need(self.policy in ("proportional", "all"), f"strategy.pool.policy={self.policy!r}: choose proportional or all")
        need(self.async_overlap or not self.wavefront,
             "strategy.pool.wavefront=true needs strategy.pool.async_overlap=true (it orders the overlapped units)")
        need(0 < self.kv_memory_fraction <= 1, f"strategy.pool.kv_memory_fraction={self.kv_memory_fraction} must be in (0, 1]")


@dataclass
class StrategyConfig:
    name: str = "reference"
    kind: str = "reference"  # reference | static | dcp (static with sharded-KV attention) | fa_pool
    tp: int = 1  # tensor-parallel ranks (the base group's size for fa_pool)
    kv_shards: int = 1  # dcp: ranks of a TP group that split every sequence's KV (divides tp; 1 = plain TP)
    pp: int = 1  # pipeline stages
    micro_batches: int = 1  # decode micro-batches (pipeline stages or pool/base overlap)
    world_size: int = 1  # declared ranks; must equal tp * pp (+ pool.size)
    schedule: str = "continuous"  # pipeline: continuous (step k+1 enters as its tokens return) | gpipe (a bubble per step)
    cuda_graphs: bool = True  # static and reference on CUDA: each micro-batch's stage pass replayed from a CUDA graph
    kv_block: int = 256  # tokens per block of a static rank's KV cache (the paged kernel's unit)
    prefill_chunk: int = 0  # prompt tokens per prefill pass (0: whole prompts), whole KV blocks; bounds the
    #                         attention mask at batch x chunk x prompt length instead of batch x prompt length^2
    pool: PoolConfig = field(default_factory=PoolConfig)

    def __post_init__(self):
        need(self.kind in STRATEGY_KINDS, f"strategy.kind={self.kind!r} is unknown; choose one of {', '.join(STRATEGY_KINDS)}")
        at_least("strategy", self, 1, "tp", "pp", "micro_batches", "world_size", "kv_block", "kv_shards")
        need(self.tp % self.kv_shards == 0,
             f"strategy.kv_shards={self.kv_shards} does not divide strategy.tp={self.tp}: KV-shard groups split the TP group")
        need(self.kv_shards == 1 or self.kind == "dcp",
             f"strategy.kv_shards={self.kv_shards} applies to strategy.kind=dcp only (got kind={self.kind!r}); set it to 1")
        need(self.schedule in SCHEDULES, f"strategy.schedule={self.schedule!r}: choose {' or '.join(SCHEDULES)}")
        at_least("strategy", self, 0, "prefill_chunk")
        unit = ("strategy.pool.block_size", self.pool.block_size) if self.kind == "fa_pool" else ("strategy.kv_block", self.kv_block)
        need(self.prefill_chunk % unit[1] == 0,
             f"strategy.prefill_chunk={self.prefill_chunk} must be a multiple of {unit[0]}={unit[1]} "
             f"(a chunk fills whole KV blocks)")


WORKLOAD_KINDS = ("batch", "trace")
SERVING_KINDS = ("reference", "static", "dcp", "fa_pool")  # strategy kinds whose engines serve a changing batch (workload.kind=trace)


@dataclass
class WorkloadConfig:
    name: str = "tiny"
    kind: str = "batch"  # batch: one static batch (the fields below) | trace: replay `trace` with continuous batching
    batch_size: int = 4
    prompt_lens: List[int] = field(default_factory=lambda: [24, 40, 17, 32])  # cycled over the batch
    buckets: List[List[int]] = field(default_factory=list)  # [[min, max], ...]: sample lengths instead
    output_tokens: int = 8  # generated tokens per sequence (first one from prefill)
    warmup_steps: int = 2  # decode steps of an untimed warm-up generation
    synthetic_kv: bool = False  # fill the KV cache with random values instead of prefill (no TTFT)
    seed: int = 0  # prompts and sampled lengths
    trace: TraceConfig = field(default_factory=TraceConfig)  # kind=trace: the requests (harness/traces.py)

    def __post_init__(self):
        need(self.kind in WORKLOAD_KINDS, f"workload.kind={self.kind!r}: choose {' or '.join(WORKLOAD_KINDS)}")
        at_least("workload", self, 1, "batch_size")
        need(self.output_tokens >= 2, f"workload.output_tokens={self.output_tokens}: TPOT needs at least 2 output tokens")
        at_least("workload", self, 0, "warmup_steps", "seed")
        need(len(self.prompt_lens) > 0 or len(self.buckets) > 0, "workload: give prompt_lens or buckets")
        need(all(n >= 1 for n in self.prompt_lens), f"workload.prompt_lens={list(self.prompt_lens)}: every length must be >= 1")
        for b in self.buckets:
            need(len(b) == 2, f"workload.buckets entry {list(b)} must be [min, max]")
            need(1 <= b[0] <= b[1], f"workload.buckets entry {list(b)}: need 1 <= min <= max")


KV_POLICIES = ("reserve", "preempt")
CLOCKS = ("wall", "logical")


@dataclass
class ServingConfig:
    """serving: how a trace is replayed (used when workload.kind=trace)."""

    max_batch: int = 8  # batch slots: requests running at once (prefilling or decoding)
    token_budget: int = 256  # tokens one step computes: a decode token per running request, the rest prefill chunks
    prefill_chunk: int = 0  # most prompt tokens of one request in one step (0: the token budget)
    block_size: int = 16  # tokens per KV block
    kv_blocks: int = 0  # KV blocks per rank (0: as many as kv_memory_fraction of free GPU memory holds; on CPU
    #                     enough for max_batch requests of the longest context)
    kv_memory_fraction: float = 0.8
    max_context: int = 0  # tokens one request may hold (a slot's block table width); 0: the trace's longest
    on_kv_full: str = "reserve"  # reserve (admission control) | preempt (recompute), see harness/serving/scheduler.py
    clock: str = "wall"  # wall: arrivals at their trace times | logical: arrival t joins at step ceil(t / logical_step_ms)
    logical_step_ms: float = 20.0  # logical clock: trace time one step stands for
    slo_ttft_ms: float = 2000.0  # goodput counts requests with TTFT <= this ...
    slo_tpot_ms: float = 100.0  # ... and TPOT <= this (DistServe's definition)
    warmup_requests: int = 2  # an untimed replay of this many requests first (compiles, allocator, graphs); 0: none
    max_steps: int = 0  # stop after this many steps (0: when every request has finished); unfinished ones are counted
    # plan step k+1 while step k runs on the device, reading k's tokens after (false: read them first, then plan)
    overlap_host: bool = True
    host_step_ms: float = 0.15  # launcher=model: the host's time per step (planning, copies), added to each priced step

    def __post_init__(self):
        g = "serving"
        at_least(g, self, 1, "max_batch", "token_budget", "block_size")
        at_least(g, self, 0, "prefill_chunk", "kv_blocks", "max_context", "warmup_requests", "max_steps", "host_step_ms")
        above(g, self, 0, "logical_step_ms", "slo_ttft_ms", "slo_tpot_ms")
        need(self.on_kv_full in KV_POLICIES, f"serving.on_kv_full={self.on_kv_full!r}: choose {' or '.join(KV_POLICIES)}")
        need(self.clock in CLOCKS, f"serving.clock={self.clock!r}: choose {' or '.join(CLOCKS)}")
        need(0 < self.kv_memory_fraction <= 1, f"serving.kv_memory_fraction={self.kv_memory_fraction} must be in (0, 1]")
        need(self.token_budget >= self.max_batch,
             f"serving.token_budget={self.token_budget} < serving.max_batch={self.max_batch}: a step must hold a decode "
             f"token of every running request; raise token_budget or lower max_batch")


@dataclass
class LauncherConfig:
    name: str = "local"
    kind: str = "local"  # local | slurm | model (projected by the performance model, nothing runs)
    timeout_s: float = 600.0  # a run that takes longer is killed and recorded as timeout
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    # Slurm (kind: slurm), through submitit; one task per rank
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = 8  # GPUs (and tasks) a node offers; 0 on a CPU-only partition
    tasks_per_node: int = 0  # 0 = derived: min(world size, gpus_per_node or world size)
    nodes: int = 0  # 0 = derived: world size / tasks per node
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # per node; 0 = the partition's default
    time_min: int = 60  # Slurm time limit of one run's job
    setup: List[str] = field(default_factory=list)  # shell lines before the job (modules, environments)
    folder: Optional[str] = None  # submitit's logs; None = <run dir>/slurm
    wait: bool = True  # block until the job ends (sweeps submit every point first, then wait)
    max_requeues: int = 2  # re-runs after preemption or time-out

    def __post_init__(self):
        need(self.kind in ("local", "slurm", "model"), f"launcher.kind={self.kind!r}: choose local, slurm or model")
        need(self.dist_backend in ("auto", "gloo", "nccl"),
             f"launcher.dist_backend={self.dist_backend!r}: choose auto, gloo or nccl")
        above("launcher", self, 0, "timeout_s", "time_min")
        at_least("launcher", self, 0, "gpus_per_node", "tasks_per_node", "nodes", "mem_gb", "max_requeues")
        at_least("launcher", self, 1, "cpus_per_task")


def slurm_layout(launcher: "LauncherConfig", world: int) -> tuple[int, int]:
    """(nodes, tasks per node) of a run of `world` ranks under this launcher."""
    if launcher.nodes and not launcher.tasks_per_node:  # nodes alone: the tasks spread evenly over them
        return launcher.nodes, math.ceil(world / launcher.nodes)
    per_node = launcher.tasks_per_node or min(world, launcher.gpus_per_node or world)
    nodes = launcher.nodes or math.ceil(world / per_node)
    return nodes, per_node


@dataclass
class HardwareConfig:
    name: str = "cpu"
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16
    gpus_per_node: int = 1
    memory_gb: float = 0.0  # per device; 0 = unchecked
    peak_tflops: float = 0.0  # bf16 dense
    hbm_gbps: float = 0.0
    nvlink_gbps: float = 0.0  # per GPU, one direction
    ib_gbps: float = 0.0  # per GPU, one direction
    sm_count: int = 132  # streaming multiprocessors: the paged decode kernel sizes its splits by them

    def __post_init__(self):
        need(self.device in ("cpu", "cuda"), f"hardware.device={self.device!r}: choose cpu or cuda")
        need(self.dtype in ("float32", "bfloat16"), f"hardware.dtype={self.dtype!r}: choose float32 or bfloat16")
        at_least("hardware", self, 1, "gpus_per_node", "sm_count")
        at_least("hardware", self, 0, "memory_gb", "peak_tflops", "hbm_gbps", "nvlink_gbps", "ib_gbps")


@dataclass
class FaultConfig:
    """Faults injected on purpose, to test that failures end as records and never hang a sweep."""

    # none | raise (an exception) | kill (SIGKILL) | hang (stops answering collectives) | wrong_token (the rank
    # records a wrong token at that step, as a bug in sending tokens back would: the reference check must see it)
    # | perturb_weight (1% noise on the rank's first projection weight: an error the reference check must see)
    kind: str = "none"
    rank: int = 0  # which rank misbehaves
    step: int = 1  # at which decode step of the measured generation

    def __post_init__(self):
        need(self.kind in FAULTS, f"fault.kind={self.kind!r}: choose one of {', '.join(FAULTS)}")
        at_least("fault", self, 0, "rank")
        at_least("fault", self, 1, "step")


@dataclass
class BenchConfig:
    defaults: List[Any] = field(default_factory=lambda: [
        {"model": "tiny"}, {"strategy": "reference"}, {"workload": "tiny"},
        {"launcher": "local"}, {"hardware": "cpu"}, "_self_",
    ])
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    attention_backend: str = "math"  # math | sdpa | sdpa_flash | sdpa_cudnn | sdpa_efficient | flash_attn
    check_reference: bool = False  # also decode on one device and compare (conf/config.yaml: on for CPU + real prefill)
    profile: bool = False  # one more generation, its decode steps under torch.profiler: kernel time by kind and GPU idle time per rank
    profile_prefill: bool = False  # one more generation, its prefill under torch.profiler (needs a real prefill)
    # with profile or profile_prefill: also each rank's Chrome trace (<results dir>/traces/rank<r>.json.gz, of the
    # prefill prefill_rank<r>.json.gz; Perfetto)
    profile_trace: bool = False
    results_dir: Optional[str] = None  # where result.json goes; None = Hydra's run directory
    fault: FaultConfig = field(default_factory=FaultConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)  # workload.kind=trace: the replay's scheduler
    plan: bool = False  # print the jobs, nodes, GPUs and GPU-hours this run (or sweep) would take; run nothing
    resume: bool = True  # skip a run whose directory already holds an ok record of the same run_id
    fail_on_error: bool = True  # a multirun exits 1 when any point is not ok (after all records and the report)


def register_configs() -> None:
    # `world_size: ${sum:${.tp},${.pool.size}}` in the FA Pool presets follows a swept pool size
    OmegaConf.register_new_resolver("sum", lambda *xs: sum(int(x) for x in xs), replace=True)
    # conf/config.yaml's default for check_reference: on for CPU runs with a real prefill (the tiny default
    # sweep shows that the strategies agree); off with synthetic KV (nothing to compare) and on GPUs, where
    # a one-device reference of a multi-GPU batch may not fit: ask for it there with check_reference=true
    OmegaConf.register_new_resolver("check_by_default", lambda synthetic, device: not synthetic and device == "cpu",
                                    replace=True)
    cs = ConfigStore.instance()
    cs.store(name="bench_schema", node=BenchConfig)
    for group, node in (("model", ModelConfig), ("strategy", StrategyConfig), ("workload", WorkloadConfig),
                        ("launcher", LauncherConfig), ("hardware", HardwareConfig)):
        cs.store(group=group, name=f"{group}_schema", node=node)


def check_topology(cfg: BenchConfig) -> None:
    """GPUs per node is stated by the hardware, the Slurm launcher and the FA Pool (which reduces partials
    within a node first). Where they describe real nodes they must agree: the launcher's GPUs are the
    hardware's, and the pool's reduction groups must tile the real nodes (divide their size), or a
    'within-node' reduction would cross nodes. The local launcher runs every rank on this one machine: there
    the pool's gpus_per_node only groups ranks (tests pretend 2 to exercise both reduction levels)."""
    s, L, hw = cfg.strategy, cfg.launcher, cfg.hardware
    pool_node = s.pool.gpus_per_node if s.kind == "fa_pool" and s.pool.hierarchical else None
    if L.kind == "slurm":
        _, per_node = slurm_layout(L, s.world_size)
        if hw.device == "cuda":
            need(L.gpus_per_node == hw.gpus_per_node,
                 f"launcher.gpus_per_node={L.gpus_per_node} but hardware.gpus_per_node={hw.gpus_per_node} "
                 f"({hw.name}): set them equal, to the GPUs a node of your partition has")
        if pool_node is not None:
            need(per_node % pool_node == 0,
                 f"strategy.pool.gpus_per_node={pool_node} but the job runs {per_node} tasks per node: the "
                 f"hierarchical reduction's groups would cross nodes; set strategy.pool.gpus_per_node={per_node} "
                 f"(or a divisor of it)")
    if L.kind == "model" and pool_node is not None and hw.device == "cuda":
        need(hw.gpus_per_node % pool_node == 0,
             f"strategy.pool.gpus_per_node={pool_node} but hardware.gpus_per_node={hw.gpus_per_node} ({hw.name}): the "
             f"reduction's groups would cross the hardware's nodes; set strategy.pool.gpus_per_node={hw.gpus_per_node} "
             f"(or a divisor of it)")


# Keys that configs of earlier versions hold and this one dropped: (path, what it was). Committed records keep them.
RETIRED_KEYS = [(("strategy", "pool", "capture_tp_base"), "FA Pool capture with a TP base, a diagnostic switch "
                 "(894ce9d-fafcee2); captured steps are the default for every base since")]
# Keys added with a default other than how earlier versions ran: (path, the value a config without the key ran
# with). A committed record from before the key is read as it ran, not with today's default.
EARLIER_BEHAVIOUR = [(("strategy", "pool", "prefill_micro_batches"), 1)]  # records from before the field ran one group


def from_dict(cfg_dict: dict) -> BenchConfig:
    """The typed config of a run's config as a record or a launcher holds it (retired keys dropped, keys added
    since filled with how it ran)."""
    cfg_dict = copy.deepcopy(dict(cfg_dict))  # the caller's config is left as it was

    def parent(path):
        node = cfg_dict
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else None

    for path, _ in RETIRED_KEYS:
        if (node := parent(path)) is not None:
            node.pop(path[-1], None)
    for path, value in EARLIER_BEHAVIOUR:
        if (node := parent(path)) is not None:
            node.setdefault(path[-1], value)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig), cfg_dict))


def load(cfg) -> BenchConfig:
    """The typed config of a composed one; a field out of its range (each group's __post_init__) is a ConfigError."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except ValueError as e:  # ModelConfig lives in model/, which does not know ConfigError
        raise ConfigError(str(e)) from None


def validate_serving(cfg: BenchConfig) -> None:
    """A trace replay: a strategy that serves, a trace that loads (its file and lines checked here), a context
    that fits a slot."""
    s, w, sv = cfg.strategy, cfg.workload, cfg.serving
    need(s.kind in SERVING_KINDS,
         f"strategy.kind={s.kind!r} ({s.name}) does not serve a changing batch yet; workload.kind=trace runs "
         f"strategies of kind {', '.join(SERVING_KINDS)} (e.g. strategy=reference, tp2_pp1, tp2_pp2)")
    need(not w.synthetic_kv, "workload.synthetic_kv=true has no prompts to serve; set it false for a trace")
    need(cfg.attention_backend not in ("sdpa_flash", "flash_attn"),
         f"attention_backend={cfg.attention_backend} takes no mask, and a serving prefill chunk needs one (its rows start "
         f"at their own positions); use attention_backend=sdpa (or math)")
    need(cfg.fault.kind != "wrong_token", "fault.kind=wrong_token is a static-batch fault; a trace replay takes "
         "raise, kill, hang (at fault.step) or perturb_weight")
    need(not (cfg.profile or cfg.profile_prefill), "profile=true and profile_prefill=true profile a static batch; "
         "set them false for a trace replay")
    try:
        requests = load_trace(w.trace)
    except TraceError as e:
        raise ConfigError(str(e)) from None
    longest = int((requests.prompt_len + requests.output_len - 1).max())
    need(not sv.max_context or sv.max_context >= sv.block_size,
         f"serving.max_context={sv.max_context} is below serving.block_size={sv.block_size}")
    if sv.max_context and longest > sv.max_context:
        # such requests are refused by the scheduler and counted; say so up front only when none would run
        shortest = int((requests.prompt_len + requests.output_len - 1).min())
        need(shortest <= sv.max_context,
             f"every request of the trace holds more than serving.max_context={sv.max_context} tokens (the shortest "
             f"{shortest}); raise it, or cap the trace with workload.trace.max_context")


def file_in_the_way(directory: str | Path) -> Path | None:
    """The existing file (not a directory) at `directory` or above it, which would stop it being created."""
    for p in (Path(directory), *Path(directory).parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def validate(cfg: BenchConfig) -> None:
    """Refuse what cannot run, before anything is launched. Raises ConfigError."""
    m, s, w = cfg.model, cfg.strategy, cfg.workload
    if cfg.results_dir is not None:
        blocker = file_in_the_way(cfg.results_dir)
        need(blocker is None,
             f"results_dir={cfg.results_dir}: {blocker} is a file, and results_dir is the directory that holds the run's "
             f"result.json; give a directory (it is created if missing) or leave results_dir unset (Hydra's run directory)")
    if w.kind == "trace":
        validate_serving(cfg)
    need(m.n_heads % s.tp == 0, f"model.n_heads={m.n_heads} is not divisible by strategy.tp={s.tp}; pick tp among the divisors of n_heads")
    need(m.ffn_hidden % s.tp == 0, f"model.ffn_hidden={m.ffn_hidden} is not divisible by strategy.tp={s.tp}")
    need(m.vocab_size % s.tp == 0, f"model.vocab_size={m.vocab_size} is not divisible by strategy.tp={s.tp}")
    need(m.n_layers % s.pp == 0, f"model.n_layers={m.n_layers} is not divisible by strategy.pp={s.pp}")
    need(s.micro_batches <= w.batch_size,
         f"strategy.micro_batches={s.micro_batches} exceeds workload.batch_size={w.batch_size}: a micro-batch would be "
         f"empty; set strategy.micro_batches <= {w.batch_size}")
    if s.kind == "reference":
        need(s.tp == 1 and s.pp == 1, f"strategy.kind=reference runs on one device; got tp={s.tp}, pp={s.pp}")
    pool_ranks = s.pool.size if s.kind == "fa_pool" else 0
    if s.kind == "fa_pool":
        need(s.pp == 1, f"strategy.pp={s.pp}: the FA Pool base group is tensor-parallel only; set strategy.pp=1")
    expected = s.tp * s.pp + pool_ranks
    need(s.world_size == expected,
         f"strategy.world_size={s.world_size} but tp*pp{' + pool.size' if pool_ranks else ''} = {expected}; set strategy.world_size={expected}")
    need(0 <= cfg.fault.rank < s.world_size, f"fault.rank={cfg.fault.rank} is outside 0..{s.world_size - 1}")
    if cfg.fault.kind == "perturb_weight" and s.kind == "fa_pool":
        need(cfg.fault.rank < s.tp, f"fault.rank={cfg.fault.rank} is a pool rank, which holds no weights; pick a base rank 0..{s.tp - 1}")
    need(not (cfg.attention_backend == "flash_attn" and not w.synthetic_kv),
         "attention_backend=flash_attn cannot prefill ragged prompts (flash-attn aligns its causal mask to the bottom "
         "right); use attention_backend=sdpa, or workload.synthetic_kv=true")
    if cfg.hardware.device == "cuda" and cfg.attention_backend == "math" and not w.synthetic_kv and cfg.launcher.kind != "model":
        longest = max([hi for _, hi in w.buckets] or list(w.prompt_lens))
        rows = -(-w.batch_size // s.micro_batches)
        scores_gib = rows * (m.n_heads // s.tp) * min(s.prefill_chunk or longest, longest) * longest * 4 / 2**30
        need(scores_gib <= 4,
             f"attention_backend=math on cuda builds fp32 attention scores of {scores_gib:.0f} GiB for one prefill "
             f"chunk ({rows} rows x {m.n_heads // s.tp} heads x chunk x {longest} keys); use attention_backend=sdpa "
             f"(fused kernels; decode steps run the paged kernel either way), or a smaller strategy.prefill_chunk")
    need(not cfg.profile_trace or cfg.profile or cfg.profile_prefill,
         "profile_trace=true writes the trace of a profiled pass, which profile=false and profile_prefill=false leave "
         "out: set profile=true (decode steps) or profile_prefill=true (the prefill)")
    need(not (cfg.profile_prefill and w.synthetic_kv),
         "profile_prefill=true profiles a real prefill, and workload.synthetic_kv=true has none: set "
         "workload.synthetic_kv=false (and strategy.prefill_chunk for long prompts)")
    need(not (cfg.check_reference and w.synthetic_kv),
         "check_reference=true needs a real prefill, but workload.synthetic_kv=true fills the KV cache with random "
         "values the reference never sees; set workload.synthetic_kv=false or check_reference=false")
    check_topology(cfg)
    if cfg.launcher.kind == "slurm":
        L = cfg.launcher
        need(bool(L.partition), f"launcher {L.name!r} has no partition; set launcher.partition=<your partition>")
        nodes, per_node = slurm_layout(L, s.world_size)
        need(nodes * per_node == s.world_size,
             f"strategy.world_size={s.world_size} != launcher nodes {nodes} x tasks_per_node {per_node}; "
             f"set launcher.nodes and launcher.tasks_per_node so that their product is {s.world_size}")
        if cfg.hardware.device == "cuda":
            need(per_node <= L.gpus_per_node,
                 f"launcher.tasks_per_node={per_node} exceeds launcher.gpus_per_node={L.gpus_per_node}: one task per GPU; "
                 f"use more nodes")
    if cfg.launcher.kind != "model" and w.kind == "batch":  # a projection that cannot fit is recorded as projected oom
        too_big = check_fits(cfg)
        need(too_big is None, str(too_big))
    if cfg.launcher.kind == "local":  # what running here needs of this machine (Slurm nodes are checked there)
        import torch

        from model.attention import BackendUnavailable, check_backend

        if cfg.hardware.device == "cuda":
            need(torch.cuda.is_available(), "hardware.device=cuda but no CUDA device is visible; use hardware=cpu")
        if cfg.launcher.dist_backend == "nccl":
            need(cfg.hardware.device == "cuda" and torch.cuda.is_available(),
                 "launcher.dist_backend=nccl needs CUDA GPUs; use gloo on CPU")
        if cfg.hardware.dtype == "bfloat16" and cfg.hardware.device == "cuda":
            need(torch.cuda.is_bf16_supported(), "hardware.dtype=bfloat16 is not supported by this GPU; use float32")
        try:
            check_backend(cfg.attention_backend, cfg.hardware.device)
        except BackendUnavailable as e:
            raise ConfigError(f"attention_backend: {e}") from None
