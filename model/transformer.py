"""The single-device reference: a pre-norm decoder (RMSNorm, MHA with RoPE, GELU FFN), prefill and greedy decode.

No parallelism lives here. Strategies (model/parallel/) slice these modules' weights and swap an
attention block's `core` (where the KV cache lives and attention runs) for their own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import rope_kernel
from model.attention import attention
from model.config import ModelConfig


@dataclass
class Step:
    """What one forward pass covers: a range of cache rows (sequences) and the new tokens' places."""

    rows: slice  # cache rows (sequences) of this forward, e.g. one micro-batch
    cache_lens: torch.Tensor  # [b] tokens already in the cache per sequence
    new_lens: torch.Tensor  # [b] valid new tokens per sequence (prompt lengths at prefill, 1 at decode)
    prefill: bool = False  # a prompt from an empty cache; said by the caller, never read from the tensors (a sync)
    start: int = 0  # prefill in chunks: this chunk's first position (every row's; the cache holds the positions before)
    full: bool = False  # prefill: every row's new tokens fill the chunk (known on the host), so no length mask

    def positions(self, t: int) -> torch.Tensor:  # [b, t] absolute positions of the new tokens
        return self.cache_lens[:, None] + torch.arange(t, device=self.cache_lens.device)[None, :]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # one fused kernel on CUDA, statistics in fp32 (not six passes over x written out)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(positions: torch.Tensor, half: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, half] (fp32) of the rotary angles at positions [B, T]: once per layer, for q and k."""
    freqs = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freqs
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split convention. x: [B, H, T, D]; cos, sin: [B, T, D/2] from rope_tables."""
    if rope_kernel.available(x):  # the same math in one pass over x
        return rope_kernel.rope(x, cos, sin)
    # in fp32 (x times an fp32 factor promotes), each half written straight into the output: no fp32 copy of x
    # and no concatenation
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None], sin[:, None]  # over the heads
    out = torch.empty_like(x)
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:] = x1 * sin + x2 * cos
    return out


class LocalKV:
    """The default attention core: a preallocated KV cache on this device, attention over it."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype, device, backend: str):
        self.k = torch.zeros(batch, n_heads, max_len, head_dim, dtype=dtype, device=device)  # [B, H, S, D]
        self.v = torch.zeros_like(self.k)
        self.backend = backend

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def __call__(self, q, k, v, step: Step):  # q, k, v: [b, H, T, D] -> [b, H, T, D]
        kc, vc = self.k[step.rows], self.v[step.rows]
        if step.prefill:
            kc[:, :, : k.shape[2]] = k
            vc[:, :, : v.shape[2]] = v
            return attention(q, k, v, kv_lens=step.new_lens, causal=True, backend=self.backend)[0]
        b = torch.arange(q.shape[0], device=q.device)
        kc[b, :, step.cache_lens] = k[:, :, 0]
        vc[b, :, step.cache_lens] = v[:, :, 0]
        lens = step.cache_lens + 1
        span = int(lens.max())
        uniform = bool((lens == span).all())  # no mask needed: the fused kernels' fastest path
        return attention(q, kc[:, :, :span], vc[:, :, :span], kv_lens=None if uniform else lens, backend=self.backend)[0]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        self.wqkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)  # rows: [q heads | k heads | v heads]
        self.wo = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.core = None  # LocalKV or a strategy's core; set by setup_cache

    def qkv(self, x, step: Step):  # x: [b, T, hidden] -> q, k, v: [b, H, T, D], rotary applied
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope_tables(step.positions(t), self.head_dim // 2, self.rope_base)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_out(self, out):  # out: [b, H, T, D] -> [b, T, hidden]
        b, _, t, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))



class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, step: Step):
        return self.finish(x, self.begin(x, step))

    # The two halves of forward, for engines that start several micro-batches before finishing any: a core
    # may answer with a pending result (anything with .wait()) whose attention runs elsewhere meanwhile.
    def begin(self, x, step: Step):
        q, k, v = self.attn.qkv(self.attn_norm(x), step)
        return self.attn.core(q, k, v, step)

    def finish(self, x, attended):
        out = attended.wait() if hasattr(attended, "wait") else attended  # [b, H, T, D]
        x = x + self.attn.project_out(out)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # N(0, 1) as nn.Embedding draws it, but not on the meta device (build_model): a draw there goes through
        # torch's Python reference kernels, which import torch._dynamo or sympy, seconds of a process's start
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden, _weight=torch.empty(cfg.vocab_size, cfg.hidden))
        if not self.tok_emb.weight.is_meta:
            nn.init.normal_(self.tok_emb.weight)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, tokens, step: Step):  # tokens: [b, T] -> logits after each sequence's last new token [b, vocab]
        x = self.tok_emb(tokens)
        for block in self.blocks:
            x = block(x, step)
        # the LM head only where a next token is wanted: over a whole prompt it would cost T x vocab per row
        return self.lm_head(self.norm(last_positions(x, step.new_lens))).float()[:, 0]

    def setup_cache(self, batch: int, max_len: int, backend: str = "math"):
        p = next(self.parameters())
        for block in self.blocks:
            a = block.attn
            a.core = LocalKV(batch, a.n_heads, max_len, a.head_dim, p.dtype, p.device, backend)


def build_model(cfg: ModelConfig, dtype=torch.float32, device="cpu") -> Transformer:
    """Weights drawn from cfg.seed in a fixed order on `device` (in fp32, then cast), so every rank of one device
    type builds the same model; drawing on the GPU takes a second where the CPU takes many at paper scale."""
    with torch.device("meta"):
        model = Transformer(cfg)
    # storage on the device, uninitialized (to_empty's empty_like of a meta tensor would import sympy)
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.init_std, generator=gen)
    return model.to(dtype=dtype).eval()


def last_positions(x: torch.Tensor, new_lens: torch.Tensor) -> torch.Tensor:
    """[b, T, hidden] -> [b, 1, hidden]: the hidden state of each sequence's last valid new token."""
    return x[torch.arange(x.shape[0], device=x.device), new_lens - 1][:, None]


def keep_prompt_ends(last: torch.Tensor, x: torch.Tensor, lens: torch.Tensor, start: int) -> torch.Tensor:
    """Prefill in chunks: `last` [b, 1, hidden] with the hidden state of each prompt (lens [b]) whose last token
    falls in this chunk (x [b, t, hidden], its first position `start`) put in; the other rows kept."""
    t = x.shape[1]
    ends_here = ((lens - 1 - start) >= 0) & ((lens - 1 - start) < t)
    return torch.where(ends_here[:, None, None], last_positions(x, (lens - start).clamp(1, t)), last)


def pad_prompts(prompts: list[torch.Tensor], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lens


@torch.no_grad()
def generate(model: Transformer, prompts: list[torch.Tensor], n_new: int, backend: str = "math", on_step=None):
    """Greedy decode with a KV cache. Returns (tokens [B, n_new], logits [n_new, B, V]).

    The first new token comes from prefill; the other n_new - 1 from decode steps.
    `on_step(i)` is called after each step (0 = prefill), e.g. for timing.
    """
    device = next(model.parameters()).device
    tokens, lens = pad_prompts(prompts, device)
    batch = len(prompts)
    model.setup_cache(batch, int(lens.max()) + n_new, backend)
    rows = slice(0, batch)
    step = Step(rows, torch.zeros_like(lens), lens, prefill=True)
    logits = model(tokens, step)
    out_tokens, out_logits = [logits.argmax(-1)], [logits]
    if on_step:
        on_step(0)
    cache_lens = lens.clone()
    for i in range(1, n_new):
        step = Step(rows, cache_lens, torch.ones_like(lens))
        logits = model(out_tokens[-1][:, None], step)
        cache_lens = cache_lens + 1
        out_tokens.append(logits.argmax(-1))
        out_logits.append(logits)
        if on_step:
            on_step(i)
    return torch.stack(out_tokens, 1), torch.stack(out_logits)


@torch.no_grad()
def recompute_logits(model: Transformer, prompts: list[torch.Tensor], generated: torch.Tensor, backend="math"):
    """Logits of every generated position by running each full sequence from scratch, no cache reuse.

    The check that the KV cache is right: must equal generate()'s logits.
    """
    device = next(model.parameters()).device
    out = []
    for i in range(generated.shape[1]):
        seqs = [torch.cat([p.to(device), generated[b, :i]]) for b, p in enumerate(prompts)]
        tokens, lens = pad_prompts(seqs, device)
        model.setup_cache(len(seqs), int(lens.max()), backend)
        step = Step(slice(0, len(seqs)), torch.zeros_like(lens), lens, prefill=True)
        out.append(model(tokens, step))
    return torch.stack(out)
