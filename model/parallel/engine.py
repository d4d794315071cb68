"""What every strategy gives the runner: one Engine per rank that prefills and decodes a batch.

The runner (harness/runner.py) drives prefill and decode steps and times them; engines hold the
weights and KV shards of their rank, record their phase times in a PhaseTimer and hold the logits
where their rank produces them. One interface, so that one runner and one record serve all strategies.
"""
from __future__ import annotations

import torch

from model.transformer import Step, build_model, pad_prompts


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def micro_batches(batch: int, parts: int) -> list[range]:
    """The batch's rows cut into `parts` consecutive micro-batches whose sizes differ by at most one (the first
    batch % parts get one more row); callers keep parts <= batch (validation, or FA Pool's
    prefill capping its groups), so none is empty."""
    size, extra = divmod(batch, parts)
    starts = [m * size + min(m, extra) for m in range(parts + 1)]
    return [range(starts[m], starts[m + 1]) for m in range(parts)]


class Engine:
    role = "reference"
    has_tokens = True  # this rank knows every step's tokens (rank 0 must)
    has_logits = True  # this rank holds the logits, for the reference check
    keep_logits = False  # keep every step's logits in self.logits (the reference check's pass; a copy per step)

    def __init__(self, timer):
        self.timer = timer  # timer(phase) is a context manager that books time to a phase (harness.measure.PhaseTimer)
        self.logits = []

    def prefill(self, prompts: list[torch.Tensor], max_len: int) -> torch.Tensor | None:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError

    def decode_steps(self, tokens, n_steps, forced=None, before=lambda i: None, after=lambda i, tok: None) -> None:
        """n_steps decode steps after prefill (tokens: prefill's, where this rank knows them). forced [B, n_steps]:
        teacher forcing, step i is fed forced[:, i - 1]. before(i) runs as step i starts, after(i, tokens) once
        this rank knows step i's tokens. One step after the other; a pipeline overrides this with its schedule."""
        for i in range(1, n_steps + 1):
            before(i)
            if forced is not None and tokens is not None:
                tokens = forced[:, i - 1].to(tokens.device)
            tokens = self.decode(tokens)
            after(i, tokens)

    def synthetic_prefill(self, lens: torch.Tensor, max_len: int, seed: int) -> torch.Tensor | None:
        """Fill the KV cache with random values as if `lens` tokens had been prefilled; first tokens."""
        raise NotImplementedError(f"{type(self).__name__} has no synthetic KV")

    def timer_off(self) -> bool:
        """No phase timing now: steps may run from CUDA graphs (an instrumented pass runs eager, phase by phase)."""
        return not getattr(self.timer, "enabled", False)

    def reset_measurements(self) -> None:
        """Forget what the warm-up produced: logits, the elasticity log, bytes sent."""
        self.logits = []
        if hasattr(self, "elasticity"):
            self.elasticity = []
        if hasattr(self, "stats"):
            self.stats.bytes, self.stats.ops = {}, {}
        if hasattr(self, "replayed_passes"):  # serving: decode passes from captured graphs, and eager passes
            self.replayed_passes = self.eager_passes = 0

    def mark_prefill(self) -> None:
        """A generation's prefill ends here: what was sent so far is the prefill's (a decode roofline counts the
        rest)."""
        stats = getattr(self, "stats", None)
        self.prefill_comm = {"bytes": dict(stats.bytes), "ops": dict(stats.ops)} if stats else {"bytes": {}, "ops": {}}

    def finish(self) -> None:
        """End of generation: free what the sequences held."""

    @property
    def warmup_generations(self) -> int:
        """Untimed generations the runner runs before the measured one (each of workload.warmup_steps decode steps)."""
        return 1

    def release_graphs(self) -> None:
        """Drop captured CUDA graphs, before the process group goes: destroying NCCL communicators while graphs
        that captured their collectives are alive can hang (pytorch/pytorch#115388)."""

    def report(self) -> dict:
        """What this rank holds and did: role, bytes of weights and KV, bytes sent and received."""
        raise NotImplementedError


class ReferenceEngine(Engine):
    """One device, the plain model, eager with its dense cache: what harness/bench_gpu.py compares the graphed
    step with. fapool-bench's `reference` strategy runs the static engine with tp = pp = 1 instead (graphed)."""

    def __init__(self, cfg, device, dtype, backend, timer):
        super().__init__(timer)
        self.model = build_model(cfg, dtype, device)
        self.device, self.backend = device, backend

    @torch.no_grad()
    def prefill(self, prompts, max_len):
        tokens, lens = pad_prompts(prompts, self.device)
        self.model.setup_cache(len(prompts), max_len, self.backend)
        _time_attention(self.model, self.timer)
        self.lens = lens.clone()
        logits = self.model(tokens, Step(slice(0, len(prompts)), torch.zeros_like(lens), lens, prefill=True))
        return self._emit(logits)

    @torch.no_grad()
    def synthetic_prefill(self, lens, max_len, seed):
        self.model.setup_cache(len(lens), max_len, self.backend)
        _time_attention(self.model, self.timer)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for block in self.model.blocks:
            fill_random_kv(block.attn.core, lens, gen)
        self.lens = lens.to(self.device).clone()
        return torch.randint(0, self.model.cfg.vocab_size, (len(lens),), generator=gen, device=self.device)

    @torch.no_grad()
    def decode(self, tokens):
        step = Step(slice(0, len(self.lens)), self.lens, torch.ones_like(self.lens))
        logits = self.model(tokens[:, None], step)
        self.lens = self.lens + 1
        return self._emit(logits)

    def _emit(self, logits):
        if self.keep_logits:
            self.logits.append(logits)
        return logits.argmax(-1)

    def report(self):
        kv = sum(b.attn.core.nbytes() for b in self.model.blocks)
        return {"role": "reference", "weight_bytes": param_bytes(self.model), "kv_bytes": kv}


class TimedCore:
    """Wraps an attention core so that its time counts as the `attention` phase."""

    def __init__(self, core, timer):
        self.inner, self.timer = core, timer

    def nbytes(self):
        return self.inner.nbytes()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, q, k, v, step):
        with self.timer("attention"):
            return self.inner(q, k, v, step)


def _time_attention(model, timer):
    for block in model.blocks:
        block.attn.core = TimedCore(block.attn.core, timer)


def fill_random_kv(core, lens: torch.Tensor, gen: torch.Generator):
    """Random K/V in the first lens[b] cache positions of each sequence (synthetic_kv workloads)."""
    for cache in (core.k, core.v):
        span = int(lens.max())
        cache[:, :, :span].normal_(generator=gen)
