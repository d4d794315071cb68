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
