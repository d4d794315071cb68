"""The config schema: structured-config dataclasses behind every group in conf/, and validation.

OmegaConf refuses unknown keys and wrong types against these schemas; `validate()` refuses
combinations that are well-typed but cannot run, before anything is launched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from harness.fields import ConfigError, above, at_least, need
from harness.record import current_config
from harness.strategies import SPECS, StrategyConfig, spec_of
from harness.traces import TraceConfig, TraceError, load_trace
from model.config import ModelConfig

__all__ = ["ConfigError", "StrategyConfig", "above", "at_least", "need"]  # re-exported for the config's users

FAULTS = ("none", "raise", "kill", "hang", "wrong_token", "perturb_weight")


WORKLOAD_KINDS = ("batch", "trace")


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
    # a strategy kind's own schema (harness/strategies/), which its preset names: any kind's, so typed Any here
    strategy: Any = MISSING
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
    for group, node in (("model", ModelConfig), ("workload", WorkloadConfig), ("launcher", LauncherConfig),
                        ("hardware", HardwareConfig)):
        cs.store(group=group, name=f"{group}_schema", node=node)
    for kind, spec in SPECS.items():  # a strategy preset names its kind's schema: `defaults: [<kind>_schema, _self_]`
        cs.store(group="strategy", name=f"{kind}_schema", node=spec.config)


def from_dict(cfg_dict: dict) -> BenchConfig:
    """The typed config of a run's config as a launcher or a record holds it (a record of an earlier version is
    read as it ran: harness/record.py's current_config). The strategy takes its kind's schema."""
    cfg_dict = current_config(cfg_dict)
    schema = OmegaConf.merge(OmegaConf.structured(BenchConfig),
                             {"strategy": OmegaConf.structured(spec_of(cfg_dict["strategy"]).config)})
    return OmegaConf.to_object(OmegaConf.merge(schema, cfg_dict))


def load(cfg) -> BenchConfig:
    """The typed config of a composed one; a field out of its range (each group's __post_init__) is a ConfigError."""
    try:
        typed = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except ValueError as e:  # ModelConfig lives in model/, which does not know ConfigError
        raise ConfigError(str(e)) from None
    schema = spec_of(typed.strategy).config
    need(type(typed.strategy) is schema,
         f"strategy {typed.strategy.name!r} (kind {typed.strategy.kind}) was composed without its kind's schema: start "
         f"its preset with `defaults: [{typed.strategy.kind}_schema, _self_]` (see conf/strategy/)")
    return typed


def validate_serving(cfg: BenchConfig) -> None:
    """A trace replay: a strategy that serves, a trace that loads (its file and lines checked here), a context
    that fits a slot."""
    s, w, sv = cfg.strategy, cfg.workload, cfg.serving
    serving = [kind for kind, spec in SPECS.items() if spec.serves]
    need(spec_of(s).serves,
         f"strategy.kind={s.kind!r} ({s.name}) does not serve a changing batch yet; workload.kind=trace runs "
         f"strategies of kind {', '.join(serving)} (e.g. strategy=reference, tp2_pp1, tp2_pp2)")
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
    """Refuse combinations of fields that cannot run, before anything is launched (ConfigError). What depends on
    the machine, the memory or the Slurm layout is harness/preflight.py's, which the app runs next."""
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
    spec = spec_of(s)
    spec.check(cfg)
    expected = spec.world_size(s)
    need(s.world_size == expected,
         f"strategy.world_size={s.world_size} but tp*pp{' + pool.size' if spec.pool_ranks(s) else ''} = {expected} "
         f"({s.kind}); set strategy.world_size={expected}")
    need(0 <= cfg.fault.rank < s.world_size, f"fault.rank={cfg.fault.rank} is outside 0..{s.world_size - 1}")
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
