"""Paged decode attention against the math backend, on layouts chosen to break a kernel: ragged lengths, a
partly filled last block, blocks out of order and scattered over the pool, rows with no block at all.

On CPU the reference path runs; on a CUDA device with Triton the kernel runs and is compared in bf16 (the
`gpu` tests, run on the device machine).
"""
import math

import pytest
import torch

from model.attention import attention
from model.paged_attention import choose_splits, paged_decode, paged_decode_reference, triton_available

CUDA = torch.cuda.is_available()


def hostile_layout(lens, heads=4, dim=16, block=4, spare=7, seed=0, dtype=torch.float32, device="cpu"):
    """A block pool with `spare` unused slots, each row's blocks at random distinct slots in random order."""
    gen = torch.Generator().manual_seed(seed)
    width = max(1, max(-(-n // block) for n in lens))
    slots = len(lens) * width + spare
    k = torch.randn(slots, heads, block, dim, generator=gen).to(dtype)
    v = torch.randn(slots, heads, block, dim, generator=gen).to(dtype)
    table = torch.randperm(slots, generator=gen)[: len(lens) * width].view(len(lens), width).to(torch.int32)
    q = (torch.randn(len(lens), heads, dim, generator=gen) * 3).to(dtype)  # sharp: attention far from uniform
    to = dict(device=device)
    return (q.to(**to), k.to(**to), v.to(**to), table.to(**to), torch.tensor(lens, dtype=torch.int32, device=device))


def dense_math(q, k, v, table, lens):
    """Each row's blocks gathered in order and cut at its length, then the math backend, row by row."""
    outs, lses = [], []
    heads, block, dim = k.shape[1:]
    for i, n in enumerate(lens.tolist()):
        kk = k[table[i].long()].transpose(0, 1).reshape(heads, -1, dim)[:, :n]
        vv = v[table[i].long()].transpose(0, 1).reshape(heads, -1, dim)[:, :n]
        o, l = attention(q[i][None, :, None].float(), kk[None].float(), vv[None].float(), backend="math")
        outs.append(o[0, :, 0])
        lses.append(l[0, :, 0])
    return torch.stack(outs), torch.stack(lses)


LAYOUTS = {
    "ragged_partial_last_block": [13, 1, 7, 16, 5],
    "one_row_empty": [0, 9, 12],
    "all_empty": [0, 0],
    "one_long_row": [61],
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_reference_path_equals_math(name):
    q, k, v, table, lens = hostile_layout(LAYOUTS[name])
    out, lse = paged_decode_reference(q, k, v, table, lens)
    ref_out, ref_lse = dense_math(q, k, v, table, lens)
    empty = lens == 0
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    assert torch.allclose(out[~empty], ref_out[~empty], atol=1e-5, rtol=1e-5)
    assert torch.allclose(lse[~empty], ref_lse[~empty], atol=1e-5, rtol=1e-5)


def test_entries_past_a_rows_blocks_are_ignored():
    """Garbage in the unused part of a row's block-table entry must not change the result."""
    q, k, v, table, lens = hostile_layout([5, 9, 2], block=4)
    out, lse = paged_decode_reference(q, k, v, table, lens)
    garbage = table.clone()
    garbage[0, 2:] = 0  # row 0 uses 2 blocks
    garbage[2, 1:] = table[1, 0]  # row 2 uses 1 block
    out2, lse2 = paged_decode_reference(q, k, v, garbage, lens)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_partials_of_split_blocks_merge_to_the_whole():
    """One sequence's blocks split over two 'ranks' (an empty share included): LSE merge = unsplit attention."""
    from model.attention import merge_partials

    q, k, v, table, lens = hostile_layout([23], block=4)
    whole_out, whole_lse = paged_decode_reference(q, k, v, table, lens)
    first = paged_decode_reference(q, k, v, table[:, :3], torch.tensor([12], dtype=torch.int32))
    rest = paged_decode_reference(q, k, v, table[:, 3:], torch.tensor([11], dtype=torch.int32))
    none = paged_decode_reference(q, k, v, table[:, :1], torch.tensor([0], dtype=torch.int32))
    out, lse = merge_partials([first[0], none[0], rest[0]], [first[1], none[1], rest[1]])
    assert torch.allclose(out, whole_out, atol=1e-5) and torch.allclose(lse, whole_lse, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and triton_available("cuda")), reason="needs CUDA and Triton")
@pytest.mark.parametrize("block", [16, 64, 256])
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_triton_kernel_bf16_equals_math(block, splits):
    lens = [0, 1, block - 1, block + 1, 3 * block + 5, 2048 + 17]
    q, k, v, table, lens_t = hostile_layout(lens, heads=8, dim=128, block=block, dtype=torch.bfloat16, device="cuda")
    out, lse = paged_decode(q, k, v, table, lens_t, splits=splits)
    ref_out, ref_lse = paged_decode_reference(q, k, v, table, lens_t)
    empty = lens_t == 0
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    # bf16 inputs, fp32 accumulation in both: differences are accumulation order only
    assert (out[~empty] - ref_out[~empty]).abs().max() < 2e-2
    assert (lse[~empty] - ref_lse[~empty]).abs().max() < 1e-2 * math.log(max(lens))


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and triton_available("cuda")), reason="needs CUDA and Triton")
def test_triton_kernel_fp32_is_exact():
    """fp32 caches (the engine's float32 runs) keep fp32 products: agreement to rounding, not to bf16."""
    q, k, v, table, lens = hostile_layout([0, 5, 77, 300], heads=4, dim=64, block=16, device="cuda")
    out, lse = paged_decode(q, k, v, table, lens)
    ref_out, ref_lse = paged_decode_reference(q, k, v, table, lens)
    assert (out - ref_out).abs().max() < 1e-4 and (lse[1:] - ref_lse[1:]).abs().max() < 1e-4


@pytest.mark.parametrize("rows,heads,tokens,expected", [
    (18, 16, 32768, 4),  # a micro-batch of 18 rows on a TP2 shard: 288 programs, 1152 after 4 splits (>= 8 x 132)
    (36, 32, 32768, 1),  # 1152 programs already
    (9, 32, 32768, 4),
    (4, 8, 8192, 16),  # 8K tokens allow at most 16 splits of 512
    (1, 1, 600, 1),  # too short to split
])
def test_splits_give_every_sm_eight_programs_within_the_shortest_split(rows, heads, tokens, expected):
    splits = choose_splits(rows, heads, tokens, sm_count=132)
    assert splits == expected and splits & (splits - 1) == 0


def test_split_sweep_smoke(tmp_path):
    from harness import bench_paged

    res = bench_paged.main(["--smoke", "--splits", "--out", str(tmp_path)])
    assert len(res["points"]) == 2 and all(p["by_splits"] and p["chosen_splits"] in p["by_splits"] for p in res["points"])
    assert "chosen_over_best" in (tmp_path / "splits.md").read_text()


def test_ragged_bench_smoke(tmp_path):
    from harness import bench_paged

    res = bench_paged.main(["--smoke", "--ragged", "--out", str(tmp_path)])
    triton = {(p["batch"], p["plan"]) for p in res["points"] if p["plan"] in ("splits", "ragged", "ragged_x4")
              and "error" not in p}
    assert len(triton) == 3 * len(res["batches"])
    assert all(p["max_abs_diff_vs_splits"] < 1e-5 and p["items"] <= p["max_items"] for p in res["points"]
               if p["plan"] in ("ragged", "ragged_x4"))
    # cuDNN: a row per batch, timed where it runs (close to the split plan in bf16), else its reason
    cudnn = [p for p in res["points"] if p["plan"] == "cudnn"]
    assert len(cudnn) == len(res["batches"]) and all("error" in p or p["max_abs_diff_vs_splits"] < 2e-2 for p in cudnn)
    # dense cuDNN for the batches of one length only
    uniform = {name for name, lens in res["batches"].items() if len(set(lens)) == 1}
    assert {p["batch"] for p in res["points"] if p["plan"] == "dense_cudnn"} == uniform and uniform
    text = (tmp_path / "ragged.md").read_text()
    assert "ragged_over_splits" in text and "cudnn_over_ragged_x4" in text


def test_step_bench_smoke(tmp_path):
    from harness import bench_paged

    res = bench_paged.main(["--smoke", "--step", "--out", str(tmp_path)])
    assert res["kv_bytes"] >= 2e6 and {p["plan"] for p in res["points"]} == set(bench_paged.STEP_VARIANTS)
    timed = [p for p in res["points"] if "error" not in p]
    assert {p["plan"] for p in timed} >= {"splits", "ragged_x4"} and all(p["layers"] == 4 for p in timed)
    assert all(p["max_abs_diff_vs_splits"] < 1e-5 for p in timed if p["plan"] == "ragged_x4")
    assert "ratio_to_read_bw" in (tmp_path / "step.md").read_text() and (tmp_path / "step.json").is_file()


def test_step_bench_skips_where_the_gpu_lacks_the_memory(monkeypatch):
    """A step whose pool exceeds the GPU's free memory is not attempted; its reason says what it needs (no CUDA here:
    a stand-in for the memory query)."""
    from harness import bench_paged

    monkeypatch.setattr(bench_paged.torch.cuda, "mem_get_info", lambda device=None: (80 * 10**9, 81 * 10**9))
    reason = bench_paged.step_skip_reason(100 * 10**9, "cuda")
    assert reason.startswith("needs 102.1 GB free") and "80.0 GB of 81.0 GB are free" in reason
    assert bench_paged.step_skip_reason(25 * 10**9, "cuda") is None
    assert bench_paged.step_skip_reason(100 * 10**9, "cpu") is None
