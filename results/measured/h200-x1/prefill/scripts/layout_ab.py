"""The paged kernel over the two static layouts on one GPU, alternating: the blocks of a sequence slot-major
(PagedKV, the layout before) and StageKV's one span per sequence and head (strided views). Median of CUDA-graph
replays; prints ms and the read rate."""
import sys
import torch
sys.path.insert(0, ".")
from harness.bench_multi import _time_op
from model.paged_attention import paged_decode
from model.parallel.paged_kv import PagedKV
from model.parallel.static import StageKV

dev, dt, H, D, BS = torch.device("cuda"), torch.bfloat16, 32, 128, 256
for L, B in [(32768, 36), (16384, 72), (8192, 140), (8192, 16)]:
    old = PagedKV(1, B * (L // BS), H, BS, D, dt, dev)
    old.kv.normal_()
    old_table = torch.arange(B * (L // BS), dtype=torch.int32, device=dev).view(B, -1)
    new = StageKV(1, B, H, L, D, BS, dt, dev)
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
