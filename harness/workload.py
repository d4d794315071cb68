"""Prompts from a workload config: fixed lengths cycled over the batch, or lengths sampled from buckets."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type: the config imports this module (prompt lengths for memory), not the reverse
    import torch

    from harness.config import WorkloadConfig

# The paper's sequence buckets (section 4.5); "32768+" is capped at 2x its lower bound here.
PAPER_BUCKETS = {"short": (512, 2048), "medium": (2048, 8192), "long": (8192, 32768), "very_long": (32768, 65536)}


def prompt_lengths(w: WorkloadConfig) -> list[int]:
    if w.buckets:  # each sequence picks a bucket in turn, then a length uniformly inside it
        import torch  # here, not at the top: the config schema imports this module, and torch takes seconds

        gen = torch.Generator().manual_seed(w.seed)
        lens = []
        for i in range(w.batch_size):
            lo, hi = w.buckets[i % len(w.buckets)]
            lens.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
        return lens
    return [w.prompt_lens[i % len(w.prompt_lens)] for i in range(w.batch_size)]


def make_prompts(w: WorkloadConfig, vocab_size: int) -> list[torch.Tensor]:
    import torch

    gen = torch.Generator().manual_seed(w.seed + 1)
    return [torch.randint(0, vocab_size, (n,), generator=gen) for n in prompt_lengths(w)]
