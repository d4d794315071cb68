"""The ragged work plan of paged decode attention (model/paged_attention.RaggedPlan, paged_decode(plan="ragged")).

The plan builder is plain torch and is tested here on hand-made lengths. The kernels run on the CPU under Triton's
interpreter (a child pytest with TRITON_INTERPRET=1) and are compared with paged_decode_reference on the hostile
layouts of test_paged_attention.py; those tests skip when Triton is not installed. The `gpu` tests run the compiled kernels on CUDA, a CUDA graph replay included.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import paged_attention as pa
from model.paged_attention import RaggedPlan, paged_decode, paged_decode_reference, triton_available
from tests.test_paged_attention import LAYOUTS, hostile_layout

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent


def items_of(plan):
    """The plan's items in use as (row, start, end) tuples, and those past the count."""
    n = int(plan.count)
    rows, starts, ends = plan.item_row.tolist(), plan.item_start.tolist(), plan.item_end.tolist()
    return list(zip(rows, starts, ends))[:n], list(zip(rows, starts, ends))[n:]


def test_hand_made_lengths_give_the_expected_items():
    # 8 programs x 2 SMs over 4 heads: a target of 4 items; 117 tokens -> chunks of ceil(117 / 4) = 30 -> 32
    plan = RaggedPlan(rows=5, width=8, block=16, heads=4, sm_count=2, device="cpu", tile=16, programs_per_sm=8,
                      min_chunk=16)
    assert plan.max_items == 5 + 4  # fewer than 5 rows x 128 / 16 chunks each
    plan.build(torch.tensor([0, 100, 16, 1, 0], dtype=torch.int32))
    assert int(plan.chunk) == 32 and int(plan.count) == 6
    assert plan.offsets.tolist() == [0, 0, 4, 5, 6, 6]
    used, past = items_of(plan)
    assert used == [(1, 0, 32), (1, 32, 64), (1, 64, 96), (1, 96, 100), (2, 0, 16), (3, 0, 1)]
    assert past == [(-1, 0, 0)] * 3


def test_short_rows_stay_whole_under_the_chunk_floor():
    plan = RaggedPlan(rows=3, width=4, block=16, heads=8, sm_count=132, device="cpu", tile=16, min_chunk=48)
    assert plan.max_items == 3 * 2  # ceil(64 / 48) items per row at most
    plan.build(torch.tensor([40, 64, 7], dtype=torch.int32))
    assert int(plan.chunk) == 48
    assert items_of(plan)[0] == [(0, 0, 40), (1, 0, 48), (1, 48, 64), (2, 0, 7)]


def test_lengths_past_the_table_count_as_its_capacity():
    plan = RaggedPlan(rows=2, width=2, block=8, heads=1, sm_count=1, device="cpu", tile=16, min_chunk=16)
    plan.build(torch.tensor([1000, 3], dtype=torch.int32))
    assert items_of(plan)[0] == [(0, 0, 16), (1, 0, 3)]


def test_no_rows_and_all_empty_rows():
    plan = RaggedPlan(rows=0, width=4, block=16, heads=2, sm_count=4, device="cpu")
    assert plan.max_items == 0 and int(plan.build(torch.zeros(0, dtype=torch.int32)).count) == 0
    plan = RaggedPlan(rows=3, width=4, block=16, heads=2, sm_count=4, device="cpu")
    plan.build(torch.zeros(3, dtype=torch.int32))
    assert int(plan.count) == 0 and plan.offsets.tolist() == [0] * 4 and items_of(plan)[1] == [(-1, 0, 0)] * plan.max_items


@pytest.mark.parametrize("seed", range(20))
def test_items_tile_every_row_within_the_static_bound(seed):
    """Random batches (some rows empty, some full, one long among short): the items cover each row's tokens once,
    in order, each at most one chunk of a multiple of the tile, never more than max_items, and a rebuild in place
    leaves no item of the previous lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows, width, block, tile = int(torch.randint(1, 40, (1,), generator=gen)), 64, 16, 64
    heads, sms = int(torch.randint(1, 64, (1,), generator=gen)), int(torch.randint(1, 140, (1,), generator=gen))
    plan = RaggedPlan(rows, width, block, heads, sms, "cpu", tile=tile, min_chunk=int(torch.randint(1, 600, (1,), generator=gen)))
    buffers = [t.data_ptr() for t in (plan.count, plan.offsets, plan.item_row, plan.item_start, plan.item_end)]
    for _ in range(3):
        lens = torch.randint(0, width * block + 1, (rows,), generator=gen)
        lens[torch.rand(rows, generator=gen) < 0.3] = 0
        lens[torch.rand(rows, generator=gen) < 0.2] = width * block
        plan.build(lens.to(torch.int32))
        used, past = items_of(plan)
        chunk = int(plan.chunk)
        assert chunk % tile == 0 and chunk >= plan.min_chunk and len(used) <= plan.max_items
        assert all(item == (-1, 0, 0) for item in past)
        offsets = plan.offsets.tolist()
        for r in range(rows):
            mine = used[offsets[r]:offsets[r + 1]]
            assert all(row == r and 0 < end - start <= chunk for row, start, end in mine)
            assert [s for _, s, _ in mine] == list(range(0, int(lens[r]), chunk))
            assert (mine[-1][2] if mine else 0) == int(lens[r])
    assert buffers == [t.data_ptr() for t in (plan.count, plan.offsets, plan.item_row, plan.item_start, plan.item_end)]


def test_one_long_row_among_short_ones_gets_many_items():
    """The issue's batch (one 128K row + 63 rows of 1K, 32 heads, 132 SMs): the long row is cut into about as many
    items as the SMs' target, and max_items depends on the shapes only."""
    lens = torch.tensor([131072] + [1024] * 63, dtype=torch.int32)
    plan = RaggedPlan(64, 131072 // 16, 16, 32, 132, "cpu").build(lens)
    used, _ = items_of(plan)
    assert sum(1 for row, _, _ in used if row == 0) >= 16 and sum(1 for row, _, _ in used if row > 0) == 63
    assert plan.max_items == RaggedPlan(64, 131072 // 16, 16, 32, 132, "cpu").build(lens[:1].repeat(64)).max_items


def test_the_plan_argument_is_checked_and_the_cpu_falls_back_to_the_reference():
    q, k, v, table, lens = hostile_layout(LAYOUTS["ragged_partial_last_block"])
    out, lse = paged_decode(q, k, v, table, lens, plan="ragged")
    ref_out, ref_lse = paged_decode_reference(q, k, v, table, lens)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.raises(ValueError, match="plan="):
        paged_decode(q, k, v, table, lens, plan="rows")


# --- the kernels under Triton's interpreter (CPU) -------------------------------------------------------------------

# Triton's interpreter works only when TRITON_INTERPRET=1 is set before Triton is first imported (its language
# functions are defined then): these tests run in a child pytest started with it, or in a run started with it.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _index_a_scalar_under_numpy_2_4():
    """Triton's interpreter turns a scalar into a Python int with int() of a one-element array, which NumPy 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"), so any loop bound read from memory
    fails there (triton-lang/triton#9171, fixed upstream by squeezing the array first). The same fix, applied to
    the interpreter this child run uses; where Triton already squeezes it changes nothing."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if INTERPRETING and pa.triton is not None:
    _index_a_scalar_under_numpy_2_4()
interpreted = pytest.mark.skipif(not (INTERPRETING and pa.triton is not None),
                                 reason="runs under TRITON_INTERPRET=1 (test_kernels_under_the_triton_interpreter)")


def test_kernels_under_the_triton_interpreter():
    """The interpreted_ tests of this file in a child pytest with TRITON_INTERPRET=1: all must run and pass."""
    pytest.importorskip("triton")
    if INTERPRETING:
        pytest.skip("this run is the interpreted one")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-rs",
                           __file__, "-k", "interpreted_"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and "passed" in summary and "skipped" not in summary, proc.stdout[-6000:] + proc.stderr[-3000:]


def garbage_past_rows(table, lens, block):
    """Entries past each row's blocks replaced by slots far outside the pool: a kernel that reads them fails."""
    table = table.clone()
    for r, n in enumerate(lens.tolist()):
        table[r, -(-n // block):] = 10**6 + r
    return table


def assert_matches_reference(out, lse, q, k, v, table, lens):
    ref_out, ref_lse = paged_decode_reference(q, k, v, table.clamp(max=k.shape[0] - 1), lens)
    empty = lens == 0
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    if empty.all():
        return
    out_err = (out[~empty] - ref_out[~empty]).abs().max()
    lse_err = (lse[~empty] - ref_lse[~empty]).abs().max()
    if q.dtype == torch.float32:
        assert out_err < 1e-5 and lse_err < 1e-5
    else:  # the tolerances of test_paged_attention's bf16 kernel test
        assert out_err < 2e-2 and lse_err < 1e-2 * math.log(max(2, int(lens.max())))

INTERPRETED_CASES = [*LAYOUTS, "garbage_past_rows"]


def assert_replays_after_in_place_change(call, inputs, changed, capture_error_mode="global"):
    """call() (returning out, lse over inputs = q, k, v, table, lens) run once eagerly on a side stream (kernels
    compiled, graphs built, the allocator warmed, outside the capture), captured in a CUDA graph and replayed:
    it matches the reference, and again after q, table and lens are overwritten in place by changed."""
    q, k, v, table, lens = inputs
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        out, lse = call()
    graph.replay()
    assert_matches_reference(out, lse, q, k, v, table, lens)
    for tensor, new in zip((q, table, lens), changed):
        tensor.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(out, lse, q, k, v, table, lens)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [4, 32])  # blocks shorter than a tile, and tiles inside a block
@pytest.mark.parametrize("name", INTERPRETED_CASES)
def test_interpreted_ragged_kernel_equals_reference(name, block, dtype):
    lens = LAYOUTS.get(name, [5, 0, 61, 2, 33])
    q, k, v, table, lens_t = hostile_layout(lens, heads=2, dim=16, block=block, dtype=dtype)
    if name == "garbage_past_rows":
        table = garbage_past_rows(table, lens_t, block)
    # chunks of one 16-token tile: a long row is cut into several items
    plan = RaggedPlan(len(lens), table.shape[1], block, 2, sm_count=64, device="cpu", tile=16,
                                  min_chunk=16)
    out, lse = pa.paged_decode_ragged(q, k, v, table, lens_t, plan)
    assert_matches_reference(out, lse, q, k, v, table, lens_t)


@interpreted
def test_interpreted_plan_is_reused_for_new_lengths():
    """One plan, two calls: the second's items and partials replace the first's."""
    q, k, v, table, lens = hostile_layout([61, 3, 40], heads=2, dim=16, block=4)
    plan = RaggedPlan(3, table.shape[1], 4, 2, sm_count=8, device="cpu", tile=16, min_chunk=16)
    pa.paged_decode_ragged(q, k, v, table, lens, plan)
    shorter = torch.tensor([0, 17, 9], dtype=torch.int32)
    out, lse = pa.paged_decode_ragged(q, k, v, table, shorter, plan)
    assert_matches_reference(out, lse, q, k, v, table, shorter)


@interpreted
def test_interpreted_plan_built_once_serves_every_layer_of_a_pass():
    """A serving pass builds its work list once (pass_plan) and every layer reads its own K/V through it
    (build=False): each layer's output is its reference's."""
    q, k, v, table, lens = hostile_layout([61, 3, 40, 0], heads=2, dim=16, block=4)
    layers = [(k, v), (torch.randn_like(k), torch.randn_like(v))]
    plan = RaggedPlan(4, table.shape[1], 4, 2, sm_count=8, device="cpu", tile=16, min_chunk=16).build(lens)
    for kl, vl in layers:
        out, lse = pa.paged_decode_ragged(q, kl, vl, table, lens, plan, build=False)
        assert_matches_reference(out, lse, q, kl, vl, table, lens)
    # build=False reads the work list as built: given other lengths, the call still attends the built ones
    out, lse = pa.paged_decode_ragged(q, k, v, table, torch.tensor([9, 1, 2, 0], dtype=torch.int32), plan, build=False)
    assert_matches_reference(out, lse, q, k, v, table, lens)


@interpreted
@pytest.mark.parametrize("seed", range(8))
def test_interpreted_plan_kernel_equals_the_torch_build(seed):
    """_plan_kernel (the build on CUDA) writes the same buffers as the torch ops, over batches of 1 to 300 rows
    (several item tiles when rows are many), empty rows and lengths past the table."""
    gen = torch.Generator().manual_seed(seed)
    rows = [1, 2, 300][seed % 3] if seed < 3 else int(torch.randint(1, 300, (1,), generator=gen))
    heads, sms = int(torch.randint(1, 64, (1,), generator=gen)), int(torch.randint(1, 140, (1,), generator=gen))
    shape = dict(rows=rows, width=64, block=16, heads=heads, sm_count=sms, device="cpu",
                 min_chunk=int(torch.randint(1, 600, (1,), generator=gen)))
    lens = torch.randint(0, 64 * 16 + 50, (rows,), generator=gen).to(torch.int32)
    lens[torch.rand(rows, generator=gen) < 0.3] = 0
    by_torch = RaggedPlan(**shape).build(lens, use_triton=False)
    by_kernel = RaggedPlan(**shape)
    by_kernel.item_start.fill_(7)  # stale values must be overwritten
    by_kernel.build(lens, use_triton=True)
    for name in ("count", "chunk", "offsets", "item_row", "item_start", "item_end"):
        assert torch.equal(getattr(by_torch, name), getattr(by_kernel, name)), name


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interpreted_split_kernel_equals_reference(dtype):
    """The split path shares the ragged kernel's tile loop (_attend): checked here on the same kind of layout."""
    lens = [5, 0, 61, 2, 33]
    q, k, v, table, lens_t = hostile_layout(lens, heads=2, dim=16, block=4, dtype=dtype)
    table = garbage_past_rows(table, lens_t, 4)
    out, lse = pa._paged_decode_triton(q, k, v, table, lens_t, splits=4, tile=16)
    assert_matches_reference(out, lse, q, k, v, table, lens_t)


# --- the compiled kernels on CUDA ----------------------------------------------------------------------------------

GPU_ONLY = pytest.mark.skipif(not (CUDA and triton_available("cuda")), reason="needs CUDA and Triton")


@pytest.mark.gpu
@GPU_ONLY
@pytest.mark.parametrize("block", [16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_ragged_kernel_equals_reference_on_gpu(block, dtype):
    lens = [0, 1, block - 1, block + 1, 3 * block + 5, 20000 + 17, 0, 700]
    q, k, v, table, lens_t = hostile_layout(lens, heads=8, dim=128, block=block, dtype=dtype, device="cuda")
    table = garbage_past_rows(table, lens_t, block)
    out, lse = paged_decode(q, k, v, table, lens_t, plan="ragged")
    assert_matches_reference(out, lse, q, k, v, table, lens_t)


@pytest.mark.gpu
@GPU_ONLY
def test_ragged_kernel_replays_in_a_cuda_graph_after_tables_and_lengths_change():
    """Captured once with one batch's lengths; the block table, lengths and queries then change in place (a long row
    becomes short, an empty one long) and the replay must match the reference on the new values."""
    block, heads, dim = 16, 8, 128
    first = [3000, 0, 17, 900, 1]
    second = [5, 2900, 0, 64, 2047]
    q, k, v, table, lens = hostile_layout(first, heads=heads, dim=dim, block=block, dtype=torch.bfloat16,
                                          device="cuda", spare=200)
    q2, _, _, table2, lens2 = hostile_layout(second, heads=heads, dim=dim, block=block, dtype=torch.bfloat16,
                                             device="cuda", spare=200, seed=1)
    width = table.shape[1]
    table2 = torch.nn.functional.pad(table2, (0, width - table2.shape[1]))[:, :width]
    plan = RaggedPlan(len(first), width, block, heads, torch.cuda.get_device_properties(0).multi_processor_count, "cuda")
    assert_replays_after_in_place_change(lambda: paged_decode(q, k, v, table, lens, plan=plan),
                                         (q, k, v, table, lens), (q2, table2, lens2))

