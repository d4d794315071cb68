"""The 1-GPU prefill probes of this folder's README, run from the repository root on one GPU:
    python results/measured/h200-x1/prefill/scripts/probes.py variants|profile|attention|tail|tail_parts|layout_ab
`variants` patches functions as they were at 19bfe73 (each change alone, then together); `profile [LENGTH BATCH
CHUNK...]` gives the wall time and top kernels of the reference prefill (default: whole and in chunks of 2048 at
8 x 8K) with the code checked out; `layout_ab` times the paged kernel over the static cache's old and new layouts;
`attention` times causal attention alone on the flash, cuDNN and mem-efficient kernels; `tail` a chunk after cached
keys on flash's bottom-right kernel and on cuDNN in two parts."""
import json, os, socket, sys
import torch, torch.nn.functional as F
import torch.distributed as dist
sys.path.insert(0, ".")
import model.transformer as T
import model.parallel.static as S
from model.attention import attention as orig_attention
from model.config import PRESETS
from harness.bench_gpu import timeit, prefill_flops
from model.parallel.static import StaticEngine
from harness.config import StrategyConfig
from harness.measure import PhaseTimer

dev = torch.device("cuda")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
cfg = PRESETS["paper"]


def profile(length=8192, batch=8, *chunks):
    """profile [LENGTH BATCH CHUNK...]: wall time and top kernels of the reference prefill (chunk 0: whole)."""
    length, batch = int(length), int(batch)
    for chunk in map(int, chunks or (0, 2048)):
        st = StrategyConfig(name="reference", kind="reference", kv_block=256, prefill_chunk=chunk)
        e = StaticEngine(cfg, st, 0, 1, dev, torch.bfloat16, "sdpa", PhaseTimer(dev))
        prompts = [torch.randint(0, cfg.vocab_size, (length,)) for _ in range(batch)]
        e.prefill(prompts, length + 16); torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); e.prefill(prompts, length + 16); b.record(); torch.cuda.synchronize()
        print(f"== chunk {chunk}: wall {a.elapsed_time(b):.1f} ms")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            e.prefill(prompts, length + 16); torch.cuda.synchronize()
        evs = sorted(prof.key_averages(), key=lambda x: -x.self_device_time_total)
        total = sum(x.self_device_time_total for x in evs)
        print(f"== chunk {chunk}: {total / 1e3:.1f} ms of kernels")
        for x in evs[:28]:
            print(f"{x.self_device_time_total / 1e3:8.2f} ms {x.count:5d}  {x.key[:110]}")
        del e
        torch.cuda.empty_cache()


def layout_ab():
    """The paged kernel over the two static layouts, alternating: a sequence's blocks slot-major (PagedKV, the
    layout before) and StageKV's one span per sequence and head (strided views). Median of CUDA-graph replays."""
    from harness.bench_multi import _time_op
    from model.paged_attention import paged_decode
    from model.parallel.paged_kv import PagedKV

    dt, H, D, BS = torch.bfloat16, 32, 128, 256
    for L, B in [(32768, 36), (16384, 72), (8192, 140), (8192, 16)]:
        old = PagedKV(1, B * (L // BS), H, BS, D, dt, dev)
        old.kv.normal_()
        old_table = torch.arange(B * (L // BS), dtype=torch.int32, device=dev).view(B, -1)
        new = S.StageKV(1, B, H, L, D, BS, dt, dev)
        new.kv.normal_()
        q = torch.randn(B, H, D, device=dev, dtype=dt)
        lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        kv_bytes = 2 * B * L * H * D * 2
        res = {"old": [], "new": []}
        for _ in range(3):
            res["old"].append(_time_op(lambda: paged_decode(q, *old.layer(0), old_table, lens), graphed=True))
            res["new"].append(_time_op(lambda: paged_decode(q, *new.paged[0], new.table, lens), graphed=True))
        line = " ".join(f"{k} " + "/".join(f"{t * 1e3:.3f}" for t in v) + f" ms ({kv_bytes / min(v) / 1e12:.2f} TB/s)"
                        for k, v in res.items())
        print(f"{L}x{B}: {line}  new/old {min(res['new']) / min(res['old']):.3f}", flush=True)
        del old, new
        torch.cuda.empty_cache()


def attention():
    for b, t in ((8, 8192), (4, 16384), (2, 32768)):
        q, k, v = (torch.randn(b, 32, t, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 2 * b * 4096 * t * (t + 1)
        for name, fn in (("flash", lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, is_causal=True)),
                         ("cudnn", lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, is_causal=True)),
                         ("efficient", lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, is_causal=True))):
            try:
                s = timeit(fn, reps=5, warmup=2)
                print(f"causal attention b{b} T{t} {name}: {s * 1e3:.2f} ms, {flops / s / 1e12:.0f} TFLOP/s", flush=True)
            except Exception as e:
                print(name, "failed", repr(e)[:200])


def tail():
    """A full chunk of 2048 queries after `start` cached keys (a 32K prompt's late chunks): flash's bottom-right
    causal kernel against cuDNN over the keys before plus cuDNN causal over the chunk, merged by LSE."""
    from model import attention as A
    for b, start in ((8, 6144), (2, 14336), (2, 30720)):
        q = torch.randn(b, 32, 2048, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, 32, start + 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        flops = 4 * b * 32 * 128 * 2048 * (start + 1024.5)
        for backend in ("sdpa_flash", "sdpa"):
            s = timeit(lambda: A.attention(q, k, v, causal=True, backend=backend, q_offset=start), reps=5, warmup=2)
            print(f"chunk 2048 after {start} b{b} {backend}: {s * 1e3:.2f} ms, {flops / s / 1e12:.0f} TFLOP/s", flush=True)


def tail_parts():
    """The parts of a chunk's cuDNN tail: cuDNN and flash over the keys before the chunk, cuDNN causal over the
    chunk, copies of the key views, the stacked merge and the fused one; and whether cuDNN takes key views."""
    from model import attention as A, merge_kernel
    cud = torch.ops.aten._scaled_dot_product_cudnn_attention
    for b, start, chunk in ((8, 6144, 2048), (2, 14336, 2048), (2, 28672, 4096)):
        q = torch.randn(b, 32, chunk, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, 32, start + chunk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        kp, vp = k[:, :, :start].contiguous(), v[:, :, :start].contiguous()
        ko, vo = k[:, :, start:].contiguous(), v[:, :, start:].contiguous()
        fl_pre = 4 * b * 32 * 128 * chunk * start; fl_own = 4 * b * 32 * 128 * chunk * (chunk + 1) / 2
        r = {}
        r["prefix_cudnn"] = timeit(lambda: cud(q, kp, vp, None, True, is_causal=False), reps=5, warmup=2)
        r["prefix_flash"] = timeit(lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, kp, vp, is_causal=False), reps=5, warmup=2)
        r["own_cudnn"] = timeit(lambda: cud(q, ko, vo, None, True, is_causal=True), reps=5, warmup=2)
        r["copies"] = timeit(lambda: (k[:, :, :start].contiguous(), v[:, :, :start].contiguous()), reps=5, warmup=2)
        o1, l1 = cud(q, kp, vp, None, True, is_causal=False)[:2]; o2, l2 = cud(q, ko, vo, None, True, is_causal=True)[:2]
        l1 = l1.reshape(b, 32, -1)[..., :chunk].float(); l2 = l2.reshape(b, 32, -1)[..., :chunk].float()
        r["merge"] = timeit(lambda: A.merge_partials([o1, o2], [l1, l2]), reps=5, warmup=2)
        r["whole_tail_sdpa"] = timeit(lambda: A.attention(q, k, v, causal=True, backend="sdpa", q_offset=start), reps=5, warmup=2)
        try:
            cud(q, k[:, :, :start], v[:, :, :start], None, True, is_causal=False); torch.cuda.synchronize(); r["view_ok"] = 1
            r["prefix_cudnn_view"] = timeit(lambda: cud(q, k[:, :, :start], v[:, :, :start], None, True, is_causal=False), reps=5, warmup=2)
            ov = cud(q, k[:, :, :start], v[:, :, :start], None, True, is_causal=False)[0]
            r["view_err"] = (ov.float() - o1.float()).abs().max().item() * 1e-3
        except Exception as e:
            print("view refused:", repr(e)[:300])
        print(f"b{b} start{start} chunk{chunk}: " + ", ".join(f"{n} {t*1e3:.3f} ms" for n, t in r.items())
              + f" | prefix cudnn {fl_pre / r['prefix_cudnn'] / 1e12:.0f} TF, flash {fl_pre / r['prefix_flash'] / 1e12:.0f} TF, own {fl_own / r['own_cudnn'] / 1e12:.0f} TF", flush=True)
        r2 = timeit(lambda: merge_kernel.merge_two(o1, l1, o2, l2), reps=5, warmup=2)
        print(f"   fused merge {r2 * 1e3:.3f} ms", flush=True)


def variants():
    PEAK = 766e12
    orig_rms, orig_rope = T.RMSNorm.forward, T.apply_rope

    def rms_fused(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def rope_lean(x, positions, base):
        half = x.shape[-1] // 2
        freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
        angles = positions.float()[:, None, :, None] * freqs
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty_like(x)
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:] = x1 * sin + x2 * cos
        return out

    rope_compiled = torch.compile(orig_rope, dynamic=False)
    rms_compiled = torch.compile(orig_rms, dynamic=False)

    def attn_br(q, k, v, kv_lens=None, causal=False, backend="math", q_offset=0, key_positions=None):
        if causal and q_offset and key_positions is None and q.shape[2] + q_offset == k.shape[2]:
            out, lse = torch.ops.aten._flash_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                               None, None, q.shape[2], k.shape[2], 0.0, True, False,
                                                               scale=q.shape[-1] ** -0.5)[:2]
            return out.transpose(1, 2), lse
        return orig_attention(q, k, v, kv_lens, causal, backend, q_offset, key_positions)

    def engine(chunk):
        st = StrategyConfig(name="reference", kind="reference", kv_block=256, prefill_chunk=chunk)
        return S.StaticEngine(cfg, st, 0, 1, dev, torch.bfloat16, "sdpa", PhaseTimer(dev))

    rows = []
    def point(length, batch, chunk, variant):
        torch.cuda.empty_cache()
        e = engine(chunk)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, cfg.vocab_size, (length,), generator=g) for _ in range(batch)]
        e.prefill(prompts, length + 16)
        t = timeit(lambda: e.prefill(prompts, length + 16), reps=3, warmup=1)
        roof = prefill_flops(cfg, batch, length) / PEAK
        first = e.prefill(prompts, length + 16)
        rows.append(dict(length=length, batch=batch, chunk=chunk, variant=variant, ms=t * 1e3, ratio=t / roof))
        print(rows[-1], flush=True)
        del e
        return first

    def set_variant(rms, rope, attn):
        T.RMSNorm.forward, T.apply_rope, S.attention = rms, rope, attn

    # accuracy of bottom-right flash for a chunk vs the masked path
    q = torch.randn(2, 32, 512, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 32, 1536, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    o1, l1 = orig_attention(q, k, v, kv_lens=torch.full((2,), 1536, device=dev), causal=True, backend="sdpa", q_offset=1024)
    o2, l2 = attn_br(q, k, v, kv_lens=None, causal=True, backend="sdpa", q_offset=1024)
    o3, l3 = orig_attention(q.float(), k.float(), v.float(), kv_lens=None, causal=True, backend="math", q_offset=1024)
    print("br vs mask", (o1.float() - o2.float()).abs().max().item(), (l1 - l2).abs().max().item(),
          "br vs math", (o2.float() - o3).abs().max().item(), (l2 - l3).abs().max().item(), flush=True)

    # profile of the base whole and chunked prefill at 8K b8
    for chunk in (0, 2048):
        e = engine(chunk)
        prompts = [torch.randint(0, cfg.vocab_size, (8192,)) for _ in range(8)]
        e.prefill(prompts, 8208); torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            e.prefill(prompts, 8208); torch.cuda.synchronize()
        print(f"== profile chunk {chunk}\n" + prof.key_averages().table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=70), flush=True)
        del e

    variants = {"base": (orig_rms, orig_rope, orig_attention), "rms_fused": (rms_fused, orig_rope, orig_attention),
                "rope_lean": (orig_rms, rope_lean, orig_attention), "compiled_rms_rope": (rms_compiled, rope_compiled, orig_attention),
                "br": (orig_rms, orig_rope, attn_br), "rms_fused+rope_lean+br": (rms_fused, rope_lean, attn_br)}
    tokens = {}
    for (length, batch, chunk) in [(8192, 8, 0), (8192, 8, 2048), (32768, 2, 4096)]:
        for name, v in variants.items():
            if name == "br" and not chunk:
                continue
            set_variant(*v)
            try:
                tokens[(length, chunk, name)] = point(length, batch, chunk, name)
            except Exception as ex:
                print(name, "failed", repr(ex)[:300], flush=True)
    set_variant(*variants["base"])
    base = {k[:2]: t for k, t in tokens.items() if k[2] == "base"}
    print("tokens equal to base:", {f"{k}": bool(torch.equal(t, base[k[:2]])) for k, t in tokens.items()})
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w"), indent=1)


if __name__ == "__main__":
    {"variants": variants, "profile": profile, "attention": attention, "tail": tail, "tail_parts": tail_parts,
     "layout_ab": layout_ab}[sys.argv[1]](*sys.argv[2:])
