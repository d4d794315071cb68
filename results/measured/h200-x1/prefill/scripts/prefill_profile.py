"""Top kernels of the reference prefill (whole and chunked) on one GPU: prefill_profile.py LENGTH BATCH CHUNK..."""
import socket, sys
import torch
import torch.distributed as dist
sys.path.insert(0, ".")
from model.config import PRESETS
from harness.config import StrategyConfig
from harness.measure import PhaseTimer
from model.parallel.static import StaticEngine

dev = torch.device("cuda")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
cfg = PRESETS["paper"]
length, batch = int(sys.argv[1]), int(sys.argv[2])
for chunk in map(int, sys.argv[3:]):
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
