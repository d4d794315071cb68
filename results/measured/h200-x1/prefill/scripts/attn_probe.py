import sys, torch
sys.path.insert(0, ".")
from harness.bench_gpu import timeit
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
