"""Static tensor x pipeline parallel decode (Megatron-style), on torch.distributed (gloo or NCCL).

Ranks: rank = stage * tp + tp_rank. Each stage holds n_layers / pp blocks with weights and KV cache
sliced over its TP group; stage 0 also holds the vocab-parallel embedding, the last stage the norm and
vocab-parallel LM head.

Schedule (forward-only GPipe, per prefill or decode step): the batch is cut into `micro_batches`; stage s
takes micro-batch m from stage s-1 (same TP index), runs its blocks and sends it on, so that while stage s
works on m, stage s-1 works on m+1. The last stage sends each micro-batch's next tokens back to stage 0.
A step costs about (micro_batches + pp - 1) micro-batch-stage times, so micro_batches >= pp keeps the
bubble small. Decode has no backward pass, so 1F1B and interleaving buy nothing here.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.parallel.engine import Engine, TimedCore, fill_random_kv, micro_batches, param_bytes
from model.parallel.tp import (CommStats, VocabParallelEmbedding, VocabParallelHead, new_groups, shard_attention,
                               shard_ffn)
from model.transformer import LocalKV, Step, build_model, last_token_logits, pad_prompts


class StaticEngine(Engine):
    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        super().__init__(timer)
        tp, pp = strategy.tp, strategy.pp
        self.tp, self.pp, self.micro_batches = tp, pp, strategy.micro_batches
        self.stage, self.tp_rank = divmod(rank, tp)
        self.first, self.last = self.stage == 0, self.stage == pp - 1
        self.role = f"stage{self.stage}"
        self.has_tokens = self.first or self.last
        self.has_logits = self.last and self.tp_rank == 0
        self.device, self.dtype, self.backend = device, dtype, backend
        self.prev_rank = rank - tp if not self.first else None
        self.next_rank = rank + tp if not self.last else None
        # tokens travel from each last-stage rank to the stage-0 rank of the same TP index
        self.token_peer = (pp - 1) * tp + self.tp_rank if self.first else self.tp_rank
        self.stats = CommStats()
        tp_group = new_groups([[s * tp + t for t in range(tp)] for s in range(pp)], rank)
        self.vocab_size = model_cfg.vocab_size

        model = build_model(model_cfg, dtype, "cpu")  # same seeded weights on every rank, sliced below
        per_stage = model_cfg.n_layers // pp
        self.blocks = torch.nn.ModuleList(model.blocks[self.stage * per_stage : (self.stage + 1) * per_stage])
        for block in self.blocks:
            shard_attention(block.attn, tp, self.tp_rank, tp_group, timer, self.stats)
            shard_ffn(block.ffn, tp, self.tp_rank, tp_group, timer, self.stats)
        self.embed = VocabParallelEmbedding(model.tok_emb, tp, self.tp_rank, tp_group, timer, self.stats) if self.first else None
        self.norm = model.norm if self.last else None
        self.head = VocabParallelHead(model.lm_head, tp, self.tp_rank, tp_group, timer, self.stats) if self.last else None
        self.modules = torch.nn.ModuleList(m for m in (self.embed, self.blocks, self.norm, self.head) if m is not None)
        self.modules.to(device)
        del model

    # -- setup -------------------------------------------------------------------------------------
    def _setup_cache(self, batch: int, max_len: int):
        for block in self.blocks:
            a = block.attn
            a.core = TimedCore(LocalKV(batch, a.n_heads, max_len, a.head_dim, self.dtype, self.device, self.backend), self.timer)
        self.batch = batch

    def _micro_batches(self):  # as slices: they index the cache rows directly
        return [slice(r.start, r.stop) for r in micro_batches(self.batch, self.micro_batches)]

    # -- steps -------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts, max_len):
        tokens, lens = pad_prompts(prompts, self.device)
        self._setup_cache(len(prompts), max_len)
        self.lens = lens
        return self._step(tokens, torch.zeros_like(lens), lens)

    @torch.no_grad()
    def synthetic_prefill(self, lens, max_len, seed):
        self._setup_cache(len(lens), max_len)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for block in self.blocks:
            fill_random_kv(block.attn.core, lens, gen)
        self.lens = lens.to(self.device)
        first = torch.randint(0, self.vocab_size, (len(lens),), generator=torch.Generator().manual_seed(seed))
        return first.to(self.device) if self.has_tokens else None

    @torch.no_grad()
    def decode(self, tokens):
        cache_lens = self.lens.clone()
        new_lens = torch.ones_like(cache_lens)
        tokens = tokens[:, None] if tokens is not None else None
        out = self._step(tokens, cache_lens, new_lens)
        self.lens = self.lens + 1
        return out

    def _step(self, tokens, cache_lens, new_lens):
        t = tokens.shape[1] if tokens is not None else (int(new_lens.max()))
        hidden = self.blocks[0].attn.wqkv.in_features
        sends, next_tokens, logits_parts = [], [], []
        for rows in self._micro_batches():
            step = Step(rows, cache_lens[rows], new_lens[rows])
            if self.first:
                x = self.embed(tokens[rows])
            else:
                x = torch.empty(rows.stop - rows.start, t, hidden, dtype=self.dtype, device=self.device)
                with self.timer("synchronization"):  # waiting for the upstream stage (includes the transfer)
                    dist.recv(x, src=self.prev_rank)
                self.stats.add("pp_recv", x.nbytes)
            for block in self.blocks:
                x = block(x, step)
            if not self.last:
                with self.timer("communication"):
                    sends.append(dist.isend(x.contiguous(), dst=self.next_rank))
                self.stats.add("pp_send", x.nbytes)
                continue
            logits = last_token_logits(self.head(self.norm(x)), step.new_lens)
            logits_parts.append(logits)
            nxt = logits.argmax(-1)
            next_tokens.append(nxt)
            if not self.first:  # tokens go back to stage 0 for the next step
                with self.timer("communication"):
                    sends.append(dist.isend(nxt.contiguous(), dst=self.token_peer))
                self.stats.add("pp_send", nxt.nbytes)
        if self.first and not self.last:
            for rows in self._micro_batches():
                nxt = torch.empty(rows.stop - rows.start, dtype=torch.long, device=self.device)
                with self.timer("synchronization"):
                    dist.recv(nxt, src=self.token_peer)
                self.stats.add("pp_recv", nxt.nbytes)
                next_tokens.append(nxt)
        with self.timer("communication"):
            for s in sends:
                s.wait()
        if self.has_logits:
            self.logits.append(torch.cat(logits_parts))
        return torch.cat(next_tokens) if next_tokens else None

    def report(self):
        kv = sum(b.attn.core.nbytes() for b in self.blocks)
        return {"role": self.role, "weight_bytes": param_bytes(self.modules), "kv_bytes": kv,
                "comm_bytes": dict(self.stats.bytes), "tp_rank": self.tp_rank, "stage": self.stage}
