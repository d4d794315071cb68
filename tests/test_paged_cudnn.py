"""The cuDNN backend of paged decode attention (model/paged_attention.py: paged_decode(backend="cudnn" | "auto"),
CudnnPagedDecode, choose_backend).

On CPU: the rule behind backend="auto", the import guard, and that CPU calls still take the reference path. The
`gpu` tests (skipped without CUDA or without the cuDNN frontend, `pip install nvidia-cudnn-frontend==1.16.0`) compare
cuDNN's paged SDPA with paged_decode_reference on the hostile layouts of test_paged_attention.py (ragged rows, empty
rows, partly filled last blocks, shuffled tables, garbage past a row's blocks), on the static engines' strided view
of their KV, and in a CUDA graph replayed after the block table, lengths and query changed in place.
"""
import re
import warnings

import pytest
import torch

from model import paged_attention as pa
from model.paged_attention import (CUDNN_INSTALL, RaggedPlan, choose_backend, cudnn_available, paged_decode,
                                   paged_decode_reference)
from tests.test_paged_attention import LAYOUTS, hostile_layout
from tests.test_paged_ragged import assert_matches_reference, assert_replays_after_in_place_change, garbage_past_rows

CUDA = torch.cuda.is_available()
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


# --- the rule and the guard (CPU) -----------------------------------------------------------------------------------

MEASURED_FASTER = "a GPU measured faster with cuDNN"


@pytest.fixture
def cudnn_faster_here(monkeypatch):
    monkeypatch.setattr(pa, "CUDNN_FASTER_ON", frozenset({MEASURED_FASTER}))


@pytest.mark.parametrize("device,dtype,plan,importable,name,expected", [
    ("cuda", BF16, "splits", True, MEASURED_FASTER, "cudnn"),  # a static batch in bf16 where cuDNN measured faster
    ("cuda", FP16, "splits", True, MEASURED_FASTER, "cudnn"),
    ("cuda", BF16, "splits", True, "a GPU not measured", "triton"),  # not in CUDNN_FASTER_ON: Triton
    ("cuda", BF16, "ragged", True, MEASURED_FASTER, "triton"),  # serving rows: the ragged plan
    ("cuda", FP32, "splits", True, MEASURED_FASTER, "triton"),  # no fp32 SDPA in cuDNN
    ("cuda", BF16, "splits", False, MEASURED_FASTER, "triton"),  # the frontend not installed
    ("cpu", BF16, "splits", True, MEASURED_FASTER, "triton"),  # off CUDA the Triton path runs the reference
])
def test_auto_rule(cudnn_faster_here, device, dtype, plan, importable, name, expected):
    assert choose_backend(device, dtype, plan, cudnn_importable=importable, device_name=name) == expected


def test_auto_rule_sends_a_ragged_plan_object_to_triton(cudnn_faster_here):
    plan = RaggedPlan(rows=2, width=4, block=16, heads=2, sm_count=4, device="cpu")
    assert choose_backend("cuda", BF16, plan, cudnn_importable=True, device_name=MEASURED_FASTER) == "triton"


def test_no_gpu_is_listed_faster_with_cudnn_where_it_was_measured_slower():
    """The H100's paged measurement (bench_paged) found cuDNN's paged SDPA slower than the split plan on uniform
    batches at blocks 16, 64 and 256, so the rule keeps it on Triton."""
    assert "NVIDIA H100 80GB HBM3" not in pa.CUDNN_FASTER_ON
    assert choose_backend("cuda", BF16, "splits", cudnn_importable=True, device_name="NVIDIA H100 80GB HBM3") == "triton"


def test_the_static_engines_take_the_rule_and_serving_keeps_the_ragged_plan():
    assert pa.STATIC_BATCH_BACKEND == "auto" and pa.SERVING_PLAN == "ragged"
    assert choose_backend("cuda", BF16, pa.SERVING_PLAN, cudnn_importable=True) == "triton"


@pytest.fixture
def no_cudnn(monkeypatch):
    """The state of an install without the frontend, whatever this one has."""
    monkeypatch.setattr(pa, "_cudnn_import", {"error": "ModuleNotFoundError: No module named 'cudnn'"})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA,
                                                                                      reason="needs CUDA"))])
def test_cudnn_backend_without_the_frontend_names_the_fix(no_cudnn, device):
    q, k, v, table, lens = hostile_layout(LAYOUTS["one_row_empty"], dtype=BF16, device=device)
    with pytest.raises(RuntimeError, match=r"backend='cudnn'.*" + re.escape(CUDNN_INSTALL)):
        paged_decode(q, k, v, table, lens, backend="cudnn")
    assert not cudnn_available(device) and pa.cudnn_import_error().startswith("ModuleNotFoundError")


def test_auto_without_the_frontend_runs_like_triton(no_cudnn):
    q, k, v, table, lens = hostile_layout(LAYOUTS["ragged_partial_last_block"], dtype=BF16)
    out, lse = paged_decode(q, k, v, table, lens, backend="auto")
    ref_out, ref_lse = paged_decode(q, k, v, table, lens)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("backend", ["triton", "auto", "cudnn"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_cpu_calls_take_the_reference_whatever_the_backend(monkeypatch, backend, name):
    """On CPU tensors every backend gives paged_decode_reference's result bit for bit; "cudnn" with the frontend
    importable (a stand-in module here: it must not be touched) falls back like fp32 does."""
    monkeypatch.setattr(pa, "_cudnn_import", {"module": object()})
    q, k, v, table, lens = hostile_layout(LAYOUTS[name], dtype=BF16)
    out, lse = paged_decode(q, k, v, table, lens, backend=backend)
    ref_out, ref_lse = paged_decode_reference(q, k, v, table, lens)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_the_backend_argument_is_checked():
    q, k, v, table, lens = hostile_layout(LAYOUTS["one_long_row"])
    with pytest.raises(ValueError, match="backend="):
        paged_decode(q, k, v, table, lens, backend="flash")


# --- cuDNN on the GPU -----------------------------------------------------------------------------------------------

GPU_CUDNN = pytest.mark.skipif(not (CUDA and cudnn_available("cuda")),
                               reason=f"needs CUDA and the cuDNN frontend ({CUDNN_INSTALL})")


@pytest.mark.gpu
@GPU_CUDNN
@pytest.mark.parametrize("block", [16, 64, 256])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_cudnn_equals_reference_on_hostile_layouts(block, dtype):
    """Ragged rows, two empty ones, partly filled last blocks, a shuffled table over a pool with spare slots, and
    entries past each row's blocks pointing far outside the pool."""
    lens = [0, 1, block - 1, block + 1, 3 * block + 5, 20000 + 17, 0, 700]
    q, k, v, table, lens_t = hostile_layout(lens, heads=8, dim=128, block=block, dtype=dtype, device="cuda")
    table = garbage_past_rows(table, lens_t, block)
    out, lse = paged_decode(q, k, v, table, lens_t, backend="cudnn")
    assert out.dtype == lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:2]
    assert_matches_reference(out, lse, q, k, v, table, lens_t)


@pytest.mark.gpu
@GPU_CUDNN
@pytest.mark.parametrize("name", LAYOUTS)
def test_cudnn_equals_reference_on_the_cpu_tests_layouts(name):
    q, k, v, table, lens = hostile_layout(LAYOUTS[name], heads=4, dim=64, block=16, dtype=BF16, device="cuda")
    out, lse = paged_decode(q, k, v, table, lens, backend="cudnn")
    assert_matches_reference(out, lse, q, k, v, table, lens)


@pytest.mark.gpu
@GPU_CUDNN
def test_auto_takes_cudnn_for_the_split_plan_in_bf16(monkeypatch):
    monkeypatch.setattr(pa, "CUDNN_FASTER_ON", frozenset({torch.cuda.get_device_name()}))
    q, k, v, table, lens = hostile_layout([300, 17, 0, 64], heads=8, dim=128, block=16, dtype=BF16, device="cuda")
    key = pa.CUDNN_PAGED.key(q, k, v, table)
    out, lse = paged_decode(q, k, v, table, lens, backend="auto")
    assert key in pa.CUDNN_PAGED.graphs  # the rule picked cuDNN and it built this shape
    assert_matches_reference(out, lse, q, k, v, table, lens)


@pytest.mark.gpu
@GPU_CUDNN
def test_fp32_falls_back_to_triton():
    """cuDNN has no fp32 SDPA: backend="cudnn" and "auto" run the Triton kernel, exact to fp32 rounding."""
    q, k, v, table, lens = hostile_layout([0, 5, 77, 300], heads=4, dim=64, block=16, device="cuda")
    triton_out, triton_lse = paged_decode(q, k, v, table, lens, backend="triton")
    for backend in ("cudnn", "auto"):
        out, lse = paged_decode(q, k, v, table, lens, backend=backend)
        assert torch.equal(out, triton_out) and torch.equal(lse, triton_lse)
    assert_matches_reference(triton_out, triton_lse, q, k, v, table, lens)


@pytest.mark.gpu
@GPU_CUDNN
def test_the_static_engines_strided_view():
    """StageKV's blocks are a strided view of one span per (sequence, head) (slot stride one block, head stride one
    span): backend="auto" must match the reference through whichever kernel it takes, and cuDNN, where it builds a
    graph for these strides, must match it too."""
    from model.parallel.static import StageKV

    batch, heads, dim, block, max_len = 3, 4, 128, 16, 200
    cache = StageKV(1, batch, heads, max_len, dim, block, BF16, "cuda")
    cache.kv.normal_()
    k, v = cache.paged[0]
    lens = torch.tensor([200, 133, 1], dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, dim, dtype=BF16, device="cuda") * 3
    out, lse = paged_decode(q, k, v, cache.table, lens, backend="auto")
    assert_matches_reference(out, lse, q, k, v, cache.table, lens)
    if pa.CUDNN_PAGED.supports(q, k, v, cache.table):
        out, lse = paged_decode(q, k, v, cache.table, lens, backend="cudnn")
        assert_matches_reference(out, lse, q, k, v, cache.table, lens)
    else:
        why = pa.CUDNN_PAGED.unsupported.get(pa.CUDNN_PAGED.key(q, k, v, cache.table), "strides")
        warnings.warn(f"cuDNN builds no graph for StageKV's strides, auto took Triton: {why}")


@pytest.mark.gpu
@GPU_CUDNN
@pytest.mark.parametrize("capture_error_mode", ["global", "thread_local"])
def test_cudnn_replays_in_a_cuda_graph_after_tables_and_lengths_change(capture_error_mode):
    """Built by one eager call, captured once; the block table, lengths and queries then change in place (a long row
    becomes short, an empty one long, a row empty) and the replay must match the reference on the new values."""
    block, heads, dim = 16, 8, 128
    first = [3000, 0, 17, 900, 1]
    second = [5, 2900, 0, 64, 2047]
    q, k, v, table, lens = hostile_layout(first, heads=heads, dim=dim, block=block, dtype=BF16, device="cuda",
                                          spare=200)
    q2, _, _, table2, lens2 = hostile_layout(second, heads=heads, dim=dim, block=block, dtype=BF16, device="cuda",
                                             spare=200, seed=1)
    width = table.shape[1]
    table2 = garbage_past_rows(torch.nn.functional.pad(table2, (0, width - table2.shape[1]))[:, :width], lens2, block)
    assert_replays_after_in_place_change(lambda: paged_decode(q, k, v, table, lens, backend="cudnn"),
                                         (q, k, v, table, lens), (q2, table2, lens2), capture_error_mode)
