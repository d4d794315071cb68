"""The fast decode step (static KV, CUDA graph) computes what the plain model computes; the GPU benchmark runs."""
import json

import pytest
import torch

from harness import bench_gpu
from model.config import ModelConfig
from model.gpu_decode import GraphedDecodeStep
from model.transformer import Step, build_model

CASES = [("cpu", torch.float32, "math", False)]
if torch.cuda.is_available():
    CASES += [("cuda", torch.bfloat16, "sdpa_cudnn", True), ("cuda", torch.bfloat16, "sdpa_flash", True)]


@pytest.mark.parametrize("device,dtype,backend,graph", CASES)
def test_graphed_step_matches_the_plain_model(device, dtype, backend, graph):
    cfg = ModelConfig(n_layers=2, hidden=256, n_heads=2, ffn_hidden=512, vocab_size=512)  # head dim 128
    model = build_model(cfg, dtype, device)
    B, L = 3, 40
    fast = GraphedDecodeStep(model, B, L, backend=backend, graph=graph)
    tokens = torch.tensor([5, 17, 300], device=device)
    out = fast(tokens).clone()
    # the plain model over the same cache contents (its own LocalKV, math attention)
    model.setup_cache(B, L + 1, "math")
    for block, k, v in zip(model.blocks, fast.k, fast.v):
        block.attn.core.k[:, :, :L] = k[:, :, :L]
        block.attn.core.v[:, :, :L] = v[:, :, :L]
    lens = torch.full((B,), L, device=device)
    with torch.no_grad():
        ref = model(tokens[:, None], Step(slice(0, B), lens, torch.ones_like(lens)))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (fast.logits - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())
    assert torch.equal(out, ref.argmax(-1)) or dtype != torch.float32
    if graph:  # a replay with new tokens gives new results, not the captured ones
        fast(torch.tensor([1, 2, 3], device=device))
        assert not torch.equal(fast.logits, ref)


def test_benchmark_smoke_writes_every_section(tmp_path):
    res = bench_gpu.main(["--smoke", "--out", str(tmp_path)])
    for key in ("limits", "attention_shards", "decode_steps", "merge", "gemms", "profile", "prefill"):
        assert res[key], key
    assert [(r["length"], r["chunk"]) for r in res["prefill"]] == [(64, 64), (64, 32)]
    assert all(r["ratio_to_roofline"] > 0 for r in res["prefill"])
    assert all("error" not in r for r in res["decode_steps"])
    assert all(r["ratio_to_read_bw"] > 0 for r in res["attention_shards"])
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["model"] == "tiny"
    assert (tmp_path / "profile.txt").stat().st_size > 0


def test_prefill_flops_by_hand():
    """Tiny model (hidden 64, FFN 256, 2 layers, vocab 512), 3 prompts of 5 tokens."""
    from model.config import PRESETS

    cfg = PRESETS["tiny"]
    dense = 2 * 3 * 5 * 2 * (4 * 64 * 64 + 2 * 64 * 256)  # QKV + out (4 h^2) and up + down (2 h F) per token, layer
    causal = 3 * 2 * sum(4 * 64 * (i + 1) for i in range(5))  # q k^T and p v over keys 0..i
    head = 2 * 3 * 64 * 512  # the LM head on the last position only
    assert bench_gpu.prefill_flops(cfg, 3, 5) == dense + causal + head
