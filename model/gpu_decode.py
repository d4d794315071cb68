"""The fast decode step on one GPU: the reference model's own modules, a preallocated KV cache, and the
whole step captured in one CUDA graph so that launch overhead does not dominate small steps.

Every sequence of the batch holds the same context (the benchmark's case), so attention runs over the
cache with no mask and the fastest kernel that returns the LSE can take it (cuDNN SDPA on Hopper).
A graph is captured for one context length; a generation over growing contexts would capture one
graph per length bucket. Ragged batches stay on the eager path of model/transformer.py.
"""
from __future__ import annotations

import torch

from model.attention import attention
from model.transformer import Step, Transformer


class GraphedDecodeStep:
    def __init__(self, model: Transformer, batch: int, context: int, backend: str = "sdpa_cudnn",
                 graph: bool = True, seed: int = 0):
        cfg = model.cfg
        p = next(model.parameters())
        self.model, self.backend, self.context = model, backend, context
        gen = torch.Generator(device=p.device).manual_seed(seed)
        shape = (batch, cfg.n_heads, context + 1, cfg.head_dim)  # context tokens + the step's own token
        self.k = [torch.randn(shape, dtype=p.dtype, device=p.device, generator=gen) for _ in model.blocks]
        self.v = [torch.randn(shape, dtype=p.dtype, device=p.device, generator=gen) for _ in model.blocks]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.next_tokens = torch.zeros(batch, dtype=torch.long, device=p.device)
        lens = torch.full((batch,), context, dtype=torch.long, device=p.device)
        self.step_info = Step(slice(0, batch), lens, torch.ones_like(lens))
        self.graph = None
        if graph:
            self._capture()

    def kv_bytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    @torch.no_grad()
    def _step(self):
        m = self.model
        x = m.tok_emb(self.tokens)
        for block, kc, vc in zip(m.blocks, self.k, self.v):
            q, k, v = block.attn.qkv(block.attn_norm(x), self.step_info)
            kc[:, :, self.context] = k[:, :, 0]
            vc[:, :, self.context] = v[:, :, 0]
            out, _ = attention(q, kc, vc, backend=self.backend)
            x = x + block.attn.project_out(out)
            x = x + block.ffn(block.ffn_norm(x))
        self.logits = m.lm_head(m.norm(x))[:, 0].float()
        self.next_tokens.copy_(self.logits.argmax(-1))

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: cuDNN plans, allocator pools
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def __call__(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is not None:
            self.tokens.copy_(tokens.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.next_tokens
