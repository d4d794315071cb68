"""Static tensor x pipeline parallel decode (Megatron-style), on torch.distributed (gloo or NCCL).

Ranks: rank = stage * tp + tp_rank. Each stage holds n_layers / pp blocks with weights and KV cache
sliced over its TP group; stage 0 also holds the vocab-parallel embedding, the last stage the norm and
vocab-parallel LM head. The 1-GPU reference engine is this engine with tp = pp = 1.

The parts:
- `StageKV`: the stage's KV cache, preallocated once per batch shape, dense per sequence and head, so that a
  prefill chunk attends over views of it, and read by decode as blocks: the paged kernel
  (model/paged_attention.py) over a fixed block table, with the lengths in a device tensor: a decode step has
  the same shapes every step, so it can be captured.
- `StaticEngine._stage_decode`: one micro-batch through this stage's layers, from and into static buffers
  (input tokens or hidden state, output hidden state or tokens and logits), lengths advanced on the device.
  On CUDA each micro-batch's pass is captured in a CUDA graph (its TP all-reduces and the LM head's
  all-gather inside) after one eager step has created the communicators, and replayed from then on.
  Pipeline messages stay eager between replays: the point-to-point order between stages depends on the
  schedule, and an eager send/recv is small against a whole stage pass.
- `StaticEngine.decode_steps`: the pipeline schedule over a whole generation.
  * `continuous` (default): stage 0 starts micro-batch m of step k+1 as soon as the last stage has sent back
    m's tokens of step k, so the stages stay busy across steps (no bubble per step once micro_batches >= pp).
  * `gpipe`: stage 0 waits for every token of step k before it starts step k+1 (a bubble of pp-1 stage
    times per step), the paper's baseline.
  Hidden states travel forward on the world group, tokens back from the last stage on a group of their own,
  so that the two directions between the same two ranks never queue behind each other in one NCCL stream.
Prefill runs eagerly, GPipe-style, with dense causal attention over the prompt.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from model.attention import attention
from model.paged_attention import STATIC_BATCH_BACKEND, paged_decode
from model.parallel.engine import Engine, micro_batches, param_bytes
from model.parallel.graphs import GraphedProgram
from model.parallel.tp import (CommStats, VocabParallelEmbedding, VocabParallelHead, new_groups, shard_attention,
                               shard_ffn)
from model.parallel.serving_kv import ServingAttention, ServingKV, ServingPass
from model.transformer import Step, build_model, keep_prompt_ends, last_positions, pad_prompts


class StageKV:
    """The KV of a stage's layers for `batch` sequences of up to max_len tokens, one dense span per sequence and head:
        kv: [layers, 2 (k, v), batch, heads, span, head_dim]
    A prefill chunk's keys are a view of it (no gather, no copy: cuDNN takes the strides), and decode's paged
    kernel reads the same memory through a fixed block table: block j of sequence b, head h starts
    ((b * heads + h) * span_blocks + j) blocks into the layer, so the kernel's [slots, heads, block, head_dim] is
    a strided view (slot stride one block, head stride one span) and the table entry of (b, j) is
    b * heads * span_blocks + j. `spare`: one more block per sequence, never read, for the writes a rank must make
    but not keep (a KV shard's token held by another shard: model/parallel/dcp.py)."""

    def __init__(self, layers, batch, heads, max_len, head_dim, block_size, dtype, device, spare: bool = False):
        self.batch, self.max_len, self.block_size = batch, max_len, block_size
        self.blocks_per_seq = -(-max_len // block_size)
        span_blocks = self.blocks_per_seq + int(spare)
        self.spare_position = self.blocks_per_seq * block_size  # inside the spare block, where it exists
        self.kv = torch.zeros(layers, 2, batch, heads, span_blocks * block_size, head_dim, dtype=dtype, device=device)
        first = torch.arange(batch, device=device)[:, None] * heads * span_blocks
        self.table = (first + torch.arange(self.blocks_per_seq, device=device)).to(torch.int32)  # [batch, blocks]
        size = ((batch - 1) * heads + 1) * span_blocks, heads, block_size, head_dim  # the last slot ends the layer
        stride = block_size * head_dim, span_blocks * block_size * head_dim, head_dim, 1
        self.paged = [tuple(x.as_strided(size, stride) for x in layer) for layer in self.kv]  # per layer (k, v)

    def nbytes(self) -> int:
        return self.kv.nbytes

    def layer_bytes(self, layer: int) -> int:
        return self.kv[layer].nbytes

    def dense(self, layer: int, rows: slice, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions [0, upto) of `rows`, [b, heads, upto, head_dim] views (a chunk's keys)."""
        return self.kv[layer, 0, rows, :, :upto], self.kv[layer, 1, rows, :, :upto]

    def write_chunk(self, layer: int, rows: slice, start: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [b, heads, t, head_dim] to positions [start, start + t) of `rows`: one copy each."""
        self.kv[layer, 0, rows, :, start: start + k.shape[2]] = k
        self.kv[layer, 1, rows, :, start: start + v.shape[2]] = v

    def write_token(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v [n, heads, head_dim] to (rows[i], positions[i]): one indexed kernel each, whatever n is."""
        for cache, x in zip(self.kv[layer], (k, v)):
            cache.transpose(1, 2).index_put_((rows, positions), x)  # [batch, span, heads, D] view

    def fill_random(self, gen: torch.Generator):
        """Random K/V everywhere (synthetic KV workloads), in place."""
        self.kv.normal_(generator=gen)


class StageAttention:
    """A block's attention core on a static rank: prefill stores the prompt and attends densely; decode stores the
    new token at its length and runs the paged kernel. Nothing here reads a tensor's value on the host."""

    def __init__(self, cache: StageKV, layer: int, backend: str, timer):
        self.cache, self.layer, self.backend, self.timer = cache, layer, backend, timer

    def nbytes(self) -> int:
        return self.cache.layer_bytes(self.layer)

    def __call__(self, q, k, v, step: Step):  # q, k, v: [b, H, T, D]
        c = self.cache
        with self.timer("attention"):
            if step.prefill:  # a whole prompt (start 0) or a chunk of it after `start` cached positions
                c.write_chunk(self.layer, step.rows, step.start, k, v)
                lens = None if step.full else step.new_lens  # every row fills the chunk: no length mask
                if step.start == 0:
                    return attention(q, k, v, kv_lens=lens, causal=True, backend=self.backend)[0]
                keys, values = c.dense(self.layer, step.rows, step.start + k.shape[2])
                return attention(q, keys, values, kv_lens=None if lens is None else step.start + lens, causal=True,
                                 backend=self.backend, q_offset=step.start)[0]
            rows = torch.arange(step.rows.start, step.rows.stop, device=q.device)
            pos = step.cache_lens
            c.write_token(self.layer, rows, pos, k[:, :, 0], v[:, :, 0])
            out, _ = paged_decode(q[:, :, 0], *c.paged[self.layer], c.table[step.rows], (pos + 1).to(torch.int32),
                                  backend=STATIC_BATCH_BACKEND)
            return out.to(q.dtype)[:, :, None]


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes a serving decode pass is captured at (vLLM's: 1, 2, 4, 8, then steps of 16), up to max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class DecodeIO:
    """Static buffers of one decode bucket: its pass (slots, positions, lengths) and tokens and logits in and out."""

    def __init__(self, bucket: int, vocab: int, device):
        long = dict(dtype=torch.long, device=device)
        self.step = ServingPass(torch.zeros(bucket, **long), torch.zeros(bucket, **long), torch.ones(bucket, **long),
                                False, 1, 0)
        self.tokens_in, self.tokens_out = torch.zeros(bucket, **long), torch.zeros(bucket, **long)
        self.logits = torch.zeros(bucket, vocab, dtype=torch.float32, device=device)

    def load(self, p, tokens: torch.Tensor, pad_slot: int) -> None:
        """The pass's rows in place, the rest padding (the padding slot at position 0)."""
        n = len(p.slots)
        self.step.slots[:n].copy_(p.slots)
        self.step.slots[n:].fill_(pad_slot)
        self.step.start[:n].copy_(p.start)
        self.step.start[n:].zero_()
        self.tokens_in[:n].copy_(tokens)


# A small serving prefill pass takes the host's time to launch its kernels, not the device's, so it is replayed from a
# graph captured at a token-count bucket: rows, chunk width and the keys it spans, each rounded up to a power of two
# (at least these), while the chunk width is at most PREFILL_GRAPH_MAX_WIDTH and the keys at most
# PREFILL_GRAPH_MAX_KEYS; a bucket's pass attends through one mask whatever its rows (ServingPass.one_mask). Larger
# passes run eagerly, where the device's work dwarfs the launches.
PREFILL_GRAPH_MIN = (1, 16, 64)
PREFILL_GRAPH_MAX_WIDTH = 512
PREFILL_GRAPH_MAX_KEYS = 8192


def prefill_bucket(rows: int, width: int, upto: int) -> tuple[int, int, int]:
    """The (rows, chunk width, keys) a small prefill pass is padded to."""
    up = lambda n, least: max(least, 1 << max(n - 1, 0).bit_length())  # noqa: E731
    return up(rows, PREFILL_GRAPH_MIN[0]), up(width, PREFILL_GRAPH_MIN[1]), up(upto, PREFILL_GRAPH_MIN[2])


def prefill_graph_bucket(rows: int, width: int, upto: int, key_capacity: int, max_rows: int,
                         min_rows: int = PREFILL_GRAPH_MIN[0]):
    """The token-count bucket a serving prefill pass of `rows` rows, `width` tokens a row and `upto` keys spanned
    replays a graph of, or None where it runs eagerly: a pass whose bucket is past the PREFILL_GRAPH_MAX_* sizes, a
    row's block table (key_capacity) or the batch slots. min_rows: the fewest rows a replayed pass has (the pricer
    passes what a measured replay's record says its engine replayed: harness/serving/virtual.py)."""
    if rows < min_rows:
        return None
    bucket = prefill_bucket(rows, width, upto)
    fits = bucket[0] <= max_rows and bucket[1] <= PREFILL_GRAPH_MAX_WIDTH and bucket[2] <= min(PREFILL_GRAPH_MAX_KEYS,
                                                                                              key_capacity)
    return bucket if fits else None


class PrefillIO:
    """Static buffers of one prefill bucket: its pass (slots, starts, lengths; rows past the pass's are the padding
    slot with no tokens) and tokens in [rows, width], tokens and logits out."""

    def __init__(self, bucket: tuple[int, int, int], vocab: int, device):
        rows, width, upto = bucket
        long = dict(dtype=torch.long, device=device)
        self.step = ServingPass(torch.zeros(rows, **long), torch.zeros(rows, **long), torch.zeros(rows, **long), True,
                                width, upto, one_mask=True)
        self.tokens_in = torch.zeros(rows, width, **long)
        self.tokens_out = torch.zeros(rows, **long)
        self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)

    def load(self, p, tokens: torch.Tensor, pad_slot: int) -> None:
        n, w = tokens.shape
        self.step.slots[:n].copy_(p.slots)
        self.step.slots[n:].fill_(pad_slot)
        self.step.start[:n].copy_(p.start)
        self.step.start[n:].zero_()
        self.step.lens[:n].copy_(p.lens)
        self.step.lens[n:].zero_()
        self.tokens_in.zero_()
        self.tokens_in[:n, :w].copy_(tokens)


class StaticEngine(Engine):
    def __init__(self, model_cfg, strategy, rank, world, device, dtype, backend, timer):
        super().__init__(timer)
        tp, pp = strategy.tp, strategy.pp
        self.tp, self.pp, self.micro_batches = tp, pp, strategy.micro_batches
        self.schedule, self.use_graphs = strategy.schedule, strategy.cuda_graphs and torch.device(device).type == "cuda"
        self.kv_block, self.prefill_chunk = strategy.kv_block, strategy.prefill_chunk
        self.stage, self.tp_rank = divmod(rank, tp)
        self.first, self.last = self.stage == 0, self.stage == pp - 1
        self.role = f"stage{self.stage}" if tp * pp > 1 else "reference"
        self.has_tokens = self.first or self.last
        self.has_logits = self.last and self.tp_rank == 0
        self.device, self.dtype, self.backend = device, dtype, backend
        self.prev_rank = rank - tp if not self.first else None
        self.next_rank = rank + tp if not self.last else None
        # tokens travel from each last-stage rank to the stage-0 rank of the same TP index
        self.token_peer = (pp - 1) * tp + self.tp_rank if self.first else self.tp_rank
        self.stats = CommStats()
        tp_group = new_groups([[s * tp + t for t in range(tp)] for s in range(pp)], rank)
        self.token_group = new_groups([[t, (pp - 1) * tp + t] for t in range(tp)], rank) if pp > 1 else None
        self.vocab_size, self.hidden = model_cfg.vocab_size, model_cfg.hidden

        model = build_model(model_cfg, dtype, device)  # same seeded weights on every rank, sliced below
        self.per_stage = model_cfg.n_layers // pp
        self.blocks = torch.nn.ModuleList(model.blocks[self.stage * self.per_stage : (self.stage + 1) * self.per_stage])
        for block in self.blocks:
            shard_attention(block.attn, tp, self.tp_rank, tp_group, timer, self.stats)
            shard_ffn(block.ffn, tp, self.tp_rank, tp_group, timer, self.stats)
        self.embed = VocabParallelEmbedding(model.tok_emb, tp, self.tp_rank, tp_group, timer, self.stats) if self.first else None
        self.norm = model.norm if self.last else None
        self.head = VocabParallelHead(model.lm_head, tp, self.tp_rank, tp_group, timer, self.stats) if self.last else None
        self.modules = torch.nn.ModuleList(m for m in (self.embed, self.blocks, self.norm, self.head) if m is not None)
        del model
        self.cache, self.graphs = None, None
        if world > 1 and torch.device(device).type == "cuda":
            dist.barrier()  # the world communicator exists before the first point-to-point message

    # -- setup: storage and static buffers, allocated once per batch shape ----------------------------------
    def _new_cache(self, batch: int, max_len: int) -> StageKV:
        attn = self.blocks[0].attn
        return StageKV(self.per_stage, batch, attn.n_heads, max_len, attn.head_dim, self.kv_block, self.dtype, self.device)

    def _new_core(self, layer: int):
        return StageAttention(self.cache, layer, self.backend, self.timer)

    def _setup(self, lens: torch.Tensor, max_len: int):
        batch = len(lens)
        if self.cache is None or self.cache_shape != (batch, max_len):
            self.cache = self.graphs = None  # free the old storage (and the graphs that point into it) first
            self.cache, self.cache_shape = self._new_cache(batch, max_len), (batch, max_len)
            for layer, block in enumerate(self.blocks):
                block.attn.core = self._new_core(layer)
            self.rows = [slice(r.start, r.stop) for r in micro_batches(batch, self.micro_batches)]
            dev = self.device
            self.lens = torch.zeros(batch, dtype=torch.long, device=dev)
            self.ones = torch.ones(batch, dtype=torch.long, device=dev)
            self.tokens_in = torch.zeros(batch, dtype=torch.long, device=dev)
            self.tokens_out = torch.zeros(batch, dtype=torch.long, device=dev)
            self.logits_out = torch.zeros(batch, self.vocab_size, dtype=torch.float32, device=dev) if self.last else None
            self.hidden_in = [torch.zeros(r.stop - r.start, 1, self.hidden, dtype=self.dtype, device=dev) for r in self.rows]
            self.hidden_out = [torch.zeros_like(h) for h in self.hidden_in]
        self.lens.copy_(lens)
        self.batch = batch

    # -- prefill -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts, max_len):
        tokens, lens = pad_prompts(prompts, self.device)
        self._setup(lens, max_len)
        return self._prefill(tokens, lens, min(len(p) for p in prompts))

    @torch.no_grad()
    def synthetic_prefill(self, lens, max_len, seed):
        self._setup(lens.to(self.device), max_len)
        self.cache.fill_random(torch.Generator(device=self.device).manual_seed(seed))
        first = torch.randint(0, self.vocab_size, (len(lens),), generator=torch.Generator().manual_seed(seed))
        return first.to(self.device) if self.has_tokens else None

    def _prefill(self, tokens, lens, shortest: int):
        """The prompts through the pipeline, chunk by chunk (strategy.prefill_chunk tokens; the whole prompt when 0)
        and within a chunk micro-batch by micro-batch (eager). A chunk attends over the cached chunks before it, so
        attention's mask is batch x chunk x prompt length at most. The LM head runs once, on each prompt's last
        position (kept from the chunk that holds it). Returns the first tokens where this rank knows them."""
        total = tokens.shape[1]
        chunk = self.prefill_chunk or total
        last = torch.zeros(len(lens), 1, self.hidden, dtype=self.dtype, device=self.device) if self.last else None
        sends = []
        for start in range(0, total, chunk):
            t = min(chunk, total - start)
            new = (lens - start).clamp(0, t)  # each row's prompt tokens in this chunk
            at = torch.full_like(lens, start)  # positions of the chunk's tokens start here for every row
            for rows in self.rows:
                step = Step(rows, at[rows], new[rows], prefill=True, start=start, full=shortest >= start + t)
                if self.first:
                    x = self.embed(tokens[rows, start : start + t])
                else:
                    x = torch.empty(rows.stop - rows.start, t, self.hidden, dtype=self.dtype, device=self.device)
                    self._recv(x, self.prev_rank, None, "pp_recv")
                for block in self.blocks:
                    x = block(x, step)
                if not self.last:
                    sends.append(self._send(x.contiguous(), self.next_rank, None, "pp_send"))
                    continue
                last[rows] = keep_prompt_ends(last[rows], x, lens[rows], start)
        next_tokens = []
        if self.last:
            logits = self.head(self.norm(last))[:, 0]
            next_tokens = [logits.argmax(-1)]
            if self.has_logits and self.keep_logits:
                self.logits.append(logits)
            if not self.first:
                sends += [self._send(next_tokens[0][rows], self.token_peer, self.token_group, "pp_send")
                          for rows in self.rows]
        elif self.first:
            for rows in self.rows:
                nxt = torch.empty(rows.stop - rows.start, dtype=torch.long, device=self.device)
                self._recv(nxt, self.token_peer, self.token_group, "pp_recv")
                next_tokens.append(nxt)
        for work in sends:
            work.wait()
        return torch.cat(next_tokens) if next_tokens else None

    # -- decode --------------------------------------------------------------------------------------------
    def _stage_decode(self, m: int):
        """Micro-batch m through this stage: static buffers in and out, lengths advanced. Graph-capturable."""
        rows = self.rows[m]
        step = Step(rows, self.lens[rows], self.ones[rows])
        x = self.embed(self.tokens_in[rows][:, None]) if self.first else self.hidden_in[m]
        for block in self.blocks:
            x = block(x, step)
        if self.last:
            logits = self.head(self.norm(x))[:, 0]
            self.logits_out[rows].copy_(logits)
            self.tokens_out[rows].copy_(logits.argmax(-1))
        else:
            self.hidden_out[m].copy_(x)
        self.lens[rows] += 1

    def release_graphs(self):
        self.graphs = None
        self.decode_graphs, self.prefill_graphs = {}, {}

    def _run(self, m: int):
        if self.graphs is None or not self.timer_off():  # the instrumented pass runs eager, phase by phase
            self._stage_decode(m)
        else:
            self.graphs[m].replay()

    def _capture(self, pending):
        """One graph per micro-batch (model/parallel/graphs.py). Every rank of a TP group captures the same
        sequence of collectives, which the eager step before has already run once."""
        for work in pending:
            if work is not None:
                work.wait()
        torch.cuda.synchronize()
        self.graphs = []
        for m in range(len(self.rows)):
            program = GraphedProgram(self.stats)
            program.seg(partial(self._stage_decode, m))
            self.graphs.append(program.finish())

    @torch.no_grad()
    def decode_steps(self, tokens, n_steps, forced=None, before=lambda i: None, after=lambda i, tok: None):
        """n_steps decode steps after prefill (tokens = its tokens, where known) under the pipeline schedule.
        forced [B, n_steps]: teacher forcing, step i is fed forced[:, i - 1]. before(i) runs as step i starts on
        this rank; after(i, tokens) once this rank knows step i's tokens (stage 0: when they are back)."""
        pipelined = self.first and self.pp > 1  # stage 0 gets its tokens back from the last stage
        pending = [None] * len(self.rows)  # the send still reading micro-batch m's output buffer
        back = None  # stage 0 of a pipeline: the previous step's tokens
        for i in range(1, n_steps + 1):
            before(i)
            if i == 2 and self.use_graphs and self.graphs is None and self.timer_off():
                self._capture(pending)
            if pipelined and i > 1:
                back = torch.empty(self.batch, dtype=torch.long, device=self.device)
                if self.schedule == "gpipe":  # the whole previous step first
                    for rows in self.rows:
                        self._recv(back[rows], self.token_peer, self.token_group, "pp_recv")
                    after(i - 1, back)
            for m, rows in enumerate(self.rows):
                if self.first:
                    if pipelined and i > 1 and self.schedule == "continuous":  # only this micro-batch's tokens
                        self._recv(back[rows], self.token_peer, self.token_group, "pp_recv")
                    source = tokens if i == 1 else back if pipelined else self.tokens_out
                    self.tokens_in[rows].copy_((forced[:, i - 1] if forced is not None else source)[rows])
                else:
                    self._recv(self.hidden_in[m], self.prev_rank, None, "pp_recv")
                if pending[m] is not None:
                    pending[m].wait()  # the buffer this pass overwrites has left
                self._run(m)
                if not self.last:
                    pending[m] = self._send(self.hidden_out[m], self.next_rank, None, "pp_send")
                elif not self.first:
                    pending[m] = self._send(self.tokens_out[rows], self.token_peer, self.token_group, "pp_send")
            if pipelined and i > 1 and self.schedule == "continuous":
                after(i - 1, back)
            if self.last:
                if self.has_logits and self.keep_logits:
                    self.logits.append(self.logits_out.clone())
                after(i, self.tokens_out.clone())
        if pipelined:
            back = torch.empty(self.batch, dtype=torch.long, device=self.device)
            for rows in self.rows:
                self._recv(back[rows], self.token_peer, self.token_group, "pp_recv")
            after(n_steps, back)
        for work in pending:
            if work is not None:
                work.wait()


    # -- serving: a changing batch (model/parallel/serving_kv.py) ------------------------------------------
    def serve_block_bytes(self, block_size: int) -> int:
        """Bytes of one KV block on this rank (its layers, its heads)."""
        attn = self.blocks[0].attn
        return 2 * self.per_stage * attn.n_heads * self.kv_heads_factor * block_size * attn.head_dim * self.dtype.itemsize

    kv_heads_factor = 1  # this rank's KV heads per attention head it computes (DCP: its shard group's)

    def serve_block_tokens(self, block_size: int) -> int:
        """Tokens of a request that one scheduler block holds (one block of `block_size` on this rank)."""
        return block_size

    def serve_placement(self, block_tokens: int):
        """Where a request's KV goes, for the scheduler (FA Pool's pool; None: every rank holds its share of all)."""
        return None

    def serve_setup(self, slots: int, kv_blocks: int, block_size: int, max_blocks: int, pool_blocks: int = 0) -> None:
        """KV blocks and a block table for `slots` batch slots (and one padding slot, whose table points at the sink:
        a captured decode pass pads its rows to a bucket with it), allocated once for the whole replay (pool_blocks:
        FA Pool's pool ranks' blocks, none here)."""
        self.cache = self.graphs = None
        attn = self.blocks[0].attn
        self.serving = ServingKV(self.per_stage, slots + 1, kv_blocks, attn.n_heads * self.kv_heads_factor, block_size,
                                 attn.head_dim, max_blocks, self.dtype, self.device)
        self.cache = self.serving  # what report() counts
        for layer, block in enumerate(self.blocks):
            block.attn.core = self._serving_core(layer)
        self.pad_slot, self.buckets = slots, decode_buckets(slots)
        self.decode_io, self.decode_graphs, self.graph_pool = {}, {}, None
        self.prefill_io, self.prefill_graphs = {}, {}
        self.capture_prefill = True  # small prefill passes from graphs at token-count buckets (where decode is captured)
        self.replayed_passes = self.eager_passes = 0
        # stage 0: each slot's last emitted token, kept on the device: a decode row's input is read from here, so a
        # step can be launched before the previous step's tokens reach the host
        self.next_tokens = torch.zeros(slots + 1, dtype=torch.long, device=self.device) if self.first else None

    @property
    def feeds_decode_tokens(self) -> bool:
        """This rank embeds decode rows from its own device copy of the last tokens (not the plan's)."""
        return self.next_tokens is not None

    serve_capturable = True  # decode passes may be captured (FA Pool's base sends eager messages inside attention)

    def _graphed_decode(self) -> bool:
        return self.use_graphs and self.pp == 1 and self.serve_capturable and self.timer_off()

    def _serving_core(self, layer: int):
        return ServingAttention(self.serving, layer, self.backend, self.timer)

    @torch.no_grad()
    def serve_step(self, passes, table_updates, migrations=None) -> torch.Tensor | None:
        """One serving step: the table entries allocated for it, then each pass (ServingPass plus its input
        tokens [b, t] where this rank embeds them) through the stages (migrations: FA Pool's, none here). A decode
        row's input token is the one its slot emitted last, from `next_tokens` (the plan's copy is not read).
        Returns the tokens of every row, passes in order, where this rank knows them (stage 0 of a pipeline gets them
        back from the last stage)."""
        self.serving.update_table(table_updates)
        sends, tokens = [], []
        for p, ids in passes:
            if self.first and not p.prefill:
                ids = self.next_tokens[p.slots][:, None]
            if not p.prefill and self._graphed_decode():
                tokens.append((self._decode_captured(p, ids), None))
                continue
            bucket = self._prefill_graph_bucket(p) if p.prefill else None
            if bucket is not None:
                tokens.append((self._prefill_captured(p, ids, bucket), None))
                continue
            self.eager_passes += 1
            self.serving.current = p
            b = len(p.slots)
            step = Step(p.slots, p.start, p.lens, prefill=p.prefill)
            if self.first:
                x = self.embed(ids)
            else:
                x = torch.empty(b, p.width, self.hidden, dtype=self.dtype, device=self.device)
                self._recv(x, self.prev_rank, None, "pp_recv")
            for block in self.blocks:
                x = block(x, step)
            if not self.last:
                sends.append(self._send(x.contiguous(), self.next_rank, None, "pp_send"))
                if self.first:  # the tokens come back from the last stage
                    back = torch.empty(b, dtype=torch.long, device=self.device)
                    tokens.append((back, self._irecv(back, self.token_peer, self.token_group)))
                continue
            logits = self.head(self.norm(last_positions(x, p.lens)))[:, 0]
            if self.has_logits and self.keep_logits:
                self.logits.append(logits)
            new = logits.argmax(-1)
            tokens.append((new, None))
            if not self.first:
                sends.append(self._send(new, self.token_peer, self.token_group, "pp_send"))
        for work in sends:
            work.wait()
        for _, work in tokens:
            if work is not None:
                with self.timer("synchronization"):
                    work.wait()
        if not tokens:
            return None
        new = torch.cat([tok for tok, _ in tokens])
        if self.first:  # a prefill row that did not end its prompt writes a token its own last chunk overwrites
            self.next_tokens.index_copy_(0, torch.cat([p.slots for p, _ in passes]), new)
        return new

    def _decode_captured(self, p, ids) -> torch.Tensor:
        """A decode pass from the CUDA graph of its bucket: the rows copied into the bucket's static buffers (the rest
        point at the padding slot), the graph replayed (captured the first time a bucket comes, after one eager run
        of the same pass that computes this step). Returns the rows' tokens."""
        n = len(p.slots)
        bucket = next(b for b in self.buckets if b >= n)
        io = self._bucket_io(self.decode_io, bucket, DecodeIO)
        io.load(p, ids[:, 0], self.pad_slot)
        return self._replay_bucket(self.decode_graphs, bucket, self._decode_body, io, n)

    def _bucket_io(self, ios: dict, bucket, make):
        """The static buffers of a bucket (make(bucket, vocab, device) the first time it comes)."""
        io = ios.get(bucket)
        if io is None:
            io = ios[bucket] = make(bucket, self.vocab_size, self.device)
        return io

    def _replay_bucket(self, graphs: dict, bucket, body, io, n: int) -> torch.Tensor:
        """Replay the bucket's graph over the pass loaded in io (the first time: run body eagerly, which computes
        this step, then capture it); the logits kept where the reference check asks. Returns the n rows' tokens."""
        graph = graphs.get(bucket)
        if graph is None:
            graphs[bucket] = self._eager_then_captured(body, io)
            self.eager_passes += 1
        else:
            graph.replay()
            self.replayed_passes += 1
        if self.has_logits and self.keep_logits:
            self.logits.append(io.logits[:n].clone())
        return io.tokens_out[:n].clone()

    def _eager_then_captured(self, body, io) -> "torch.cuda.CUDAGraph":
        """body(io) run eagerly (it creates what capture needs: compiled kernels, handles), then captured."""
        body(io)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool, capture_error_mode="thread_local"):
            body(io)
        self.graph_pool = graph.pool()
        return graph

    def _prefill_graph_bucket(self, p):
        """The token-count bucket (PREFILL_GRAPH_*) whose graph a prefill pass replays, or None where it runs eagerly:
        a small pass, whose bucket's keys fit the block table."""
        if not (self.capture_prefill and self._graphed_decode()):
            return None
        key_capacity = self.serving.max_blocks * self.serving.block_size
        return prefill_graph_bucket(len(p.host_lens), p.width, p.upto, key_capacity, self.pad_slot)

    def _prefill_captured(self, p, ids, bucket) -> torch.Tensor:
        """A prefill pass padded to its token-count bucket and replayed from the bucket's graph (captured the first
        time the bucket comes, after one eager run that computes this step). Returns the rows' tokens."""
        io = self._bucket_io(self.prefill_io, bucket, PrefillIO)
        io.load(p, ids, self.pad_slot)
        return self._replay_bucket(self.prefill_graphs, bucket, self._prefill_body, io, len(p.host_lens))

    def _prefill_body(self, io: PrefillIO) -> None:
        """One prefill pass over a bucket's static buffers (one stage: embedding to tokens). Graph-capturable."""
        self.serving.current = io.step
        step = Step(io.step.slots, io.step.start, io.step.lens, prefill=True)
        x = self.embed(io.tokens_in)
        for block in self.blocks:
            x = block(x, step)
        logits = self.head(self.norm(last_positions(x, io.step.lens.clamp(min=1))))[:, 0]
        io.logits.copy_(logits)
        io.tokens_out.copy_(logits.argmax(-1))

    def serve_capture_buckets(self) -> None:
        """Capture every decode bucket's graph before a replay (every row the padding slot, whose table points at
        the sink), so that no step of the replay pays for a capture or a kernel's first compile."""
        if not self._graphed_decode():
            return
        for bucket in self.buckets:
            if bucket in self.decode_graphs:
                continue
            io = self._bucket_io(self.decode_io, bucket, DecodeIO)
            long = dict(dtype=torch.long, device=self.device)
            pad = ServingPass(torch.full((bucket,), self.pad_slot, **long), torch.zeros(bucket, **long),
                              torch.ones(bucket, **long), False, 1, 1)
            io.load(pad, torch.zeros(bucket, **long), self.pad_slot)
            self.decode_graphs[bucket] = self._eager_then_captured(self._decode_body, io)

    def _decode_body(self, io: "DecodeIO") -> None:
        """One decode pass over a bucket's static buffers (one stage: embedding to tokens). Graph-capturable."""
        self.serving.current = io.step
        step = Step(io.step.slots, io.step.start, io.step.lens)
        x = self.embed(io.tokens_in[:, None])
        for block in self.blocks:
            x = block(x, step)
        logits = self.head(self.norm(x))[:, 0]
        io.logits.copy_(logits)
        io.tokens_out.copy_(logits.argmax(-1))

    def _irecv(self, t, peer, group):
        self.stats.add("pp_recv", t.nbytes)
        return dist.irecv(t, src=peer, group=group)

    # -- messages ------------------------------------------------------------------------------------------
    def _send(self, t, peer, group, key):
        self.stats.add(key, t.nbytes)
        return dist.isend(t, dst=peer, group=group)

    def _recv(self, t, peer, group, key):
        with self.timer("synchronization"):  # waiting for the peer stage (includes the transfer)
            dist.recv(t, src=peer, group=group)
        self.stats.add(key, t.nbytes)

    def report(self):
        return {"role": self.role, "weight_bytes": param_bytes(self.modules), "kv_bytes": self.cache.nbytes(),
                "comm_bytes": dict(self.stats.bytes), "comm_ops": dict(self.stats.ops), "tp_rank": self.tp_rank, "stage": self.stage,
                "cuda_graphs": self.graphs is not None, "schedule": self.schedule if self.pp > 1 else None,
                "serving_passes": {"replayed": self.replayed_passes, "eager": self.eager_passes}
                if hasattr(self, "replayed_passes") else None}
