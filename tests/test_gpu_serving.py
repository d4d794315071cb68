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


def test_a_step_does_not_synchronize_with_the_host(tmp_path):
    """Inside a step (engine.serve_step) nothing waits for the device: the replay reads a step's tokens outside it,
    and a step goes to the device before the previous step's tokens are read. Counted with torch's sync debug mode.
    Every decode bucket is captured when the KV is set up, so no step captures one; a second replay on the same
    engine keeps its KV and graphs."""
    if GPUS < 1:
        pytest.skip("needs a CUDA GPU")
    import tempfile
    import warnings

    import torch.distributed as dist

    from harness.bench_serving import config
    from harness.measure import PhaseTimer
    from harness.runner import build_engine
    from harness.serving.replay import replay

    cfg, _ = config(["workload=tiny_mooncake", "workload.trace.first_n=12", "hardware=cuda", "attention_backend=sdpa",
                     "hardware.dtype=bfloat16", "serving.clock=logical", "serving.warmup_requests=0",
                     "check_reference=false"])
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{tempfile.mktemp(dir=tmp_path)}", rank=0, world_size=1)
    try:
        engine = build_engine(cfg, 0, 1, device, PhaseTimer(device, enabled=False))
        step_of, counts = engine.serve_step, []

        def counted(passes, updates, migrations=None):
            graphs = len(getattr(engine, "decode_graphs", {}))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = step_of(passes, updates, migrations)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            # torch's warning for each synchronizing call (not its one-time note that the mode is a prototype)
            syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
            prefill = any(p.prefill for p, _ in passes)
            counts.append((prefill, len(engine.decode_graphs) > graphs, syncs))
            return out

        engine.serve_step = counted
        result = replay(cfg, engine, 0, device)
        kv, graphs = engine.serving, dict(engine.decode_graphs)
        assert set(graphs) == set(engine.buckets)
        again = replay(cfg, engine, 0, device)
        assert engine.serving is kv and engine.decode_graphs == graphs
    finally:
        dist.destroy_process_group()
    assert result.scheduler.done() and again.scheduler.done()
    assert len(counts) == result.scheduler.steps + again.scheduler.steps
    assert not any(captured for _, captured, _ in counts)
    assert any(prefill for prefill, _, _ in counts) and any(not prefill for prefill, _, _ in counts)
    assert all(not syncs for _, _, syncs in counts), [syncs for _, _, syncs in counts if syncs][:3]
    assert sum(result.scheduler.log["launched_ahead"]) > result.scheduler.steps // 2
