"""Serving on CUDA: decode passes replayed from captured graphs at bucket sizes, each request against the plain
model (teacher-forced), and the same tokens as eager steps. Skipped without enough GPUs (jobs/serve_gpu.sh runs it)."""
import pandas as pd
import pytest
import torch

from harness.serving.run import STEPS_FILE
from tests.conftest import launch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TRACE = ["workload=tiny_mooncake", "workload.trace.first_n=12", "model.init_std=0.3", "hardware=cuda",
         "attention_backend=sdpa", "serving.clock=logical", "check_reference=true", "launcher.timeout_s=180"]
CASES = [("reference", 1), ("tp2_pp1", 2), ("dcp_t2_k2", 2), ("fa_pool_b2_p2", 4)]


pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy,gpus", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_serving_on_gpus_matches_the_plain_model(strategy, gpus, dtype, tmp_path):
    if GPUS < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs, this machine has {GPUS}")
    extra = ["strategy.pool.gpus_per_node=4", "strategy.pool.threshold=120"] if strategy.startswith("fa_pool") else []
    runs = {}
    for graphs in ("true", "false"):
        rec = launch([*TRACE, f"strategy={strategy}", f"hardware.dtype={dtype}", f"strategy.cuda_graphs={graphs}", *extra],
                     tmp_path / graphs)
        assert rec["status"] == "ok", rec["error"]
        assert rec["reference_check"]["passed"], rec["reference_check"]
        runs[graphs] = (rec, pd.read_csv(tmp_path / graphs / STEPS_FILE))
    (on, steps_on), (off, steps_off) = runs["true"], runs["false"]
    captured = not strategy.startswith("fa_pool")  # FA Pool's base sends eagerly inside attention
    assert (steps_on.replayed.sum() > 0) == captured and steps_off.replayed.sum() == 0
    decode_sizes = steps_on[steps_on.decode_rows > 0].decode_rows
    assert decode_sizes.nunique() > 2  # requests joined and left: the decode pass changed buckets mid-replay
    if dtype == "float32":
        assert on["tokens_sha256"] == off["tokens_sha256"]


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_a_packed_prefill_through_varlen_flash_matches_the_masked_one():
    """The serving prefill of more than 2 rows: packed into torch's variable-length flash kernel, against the same
    rows through one mask (fp32 reference), bf16."""
    from model.attention import attention
    from model.parallel import serving_kv
    from model.parallel.serving_kv import ServingAttention, ServingPass

    if serving_kv.varlen_causal is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    gen = torch.Generator(device="cuda").manual_seed(0)
    starts, lens = (0, 130, 517, 64, 2000), (300, 64, 1, 200, 48)
    b, heads, dim, width, upto = len(lens), 4, 128, max(lens), max(s + n for s, n in zip(starts, lens))
    q = torch.randn(b, heads, width, dim, generator=gen, device="cuda")
    keys, values = (torch.randn(b, heads, upto, dim, generator=gen, device="cuda") for _ in range(2))
    start, n = torch.tensor(starts, device="cuda"), torch.tensor(lens, device="cuda")
    p = ServingPass(torch.arange(b, device="cuda"), start, n, True, width, upto, host_start=starts, host_lens=lens)
    packed = ServingAttention._packed(q.bfloat16(), keys.bfloat16(), values.bfloat16(), p).float()
    masked, _ = attention(q, keys, values, kv_lens=start + n, causal=True, q_offset=start)
    valid = torch.arange(width, device="cuda")[None, :] < n[:, None]
    err = (packed.transpose(1, 2)[valid] - masked.transpose(1, 2)[valid]).abs().max().item()
    assert err < 3e-2, err
    assert packed.transpose(1, 2)[~valid].abs().max().item() == 0
