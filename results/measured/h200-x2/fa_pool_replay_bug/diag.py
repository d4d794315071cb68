"""FA Pool 1+1 grouped prefill on 2 GPUs: does a variant match the plain model. One variant per process (argv[1]):
the launcher's forkserver keeps the environment of its first launch."""
import os
import pathlib
import sys
import tempfile

from tests.conftest import launch

BASE = ["strategy=fa_pool_b2_p2", "strategy.tp=1", "strategy.pool.size=1", "strategy.pool.max_size=1",
        "strategy.world_size=2", "strategy.pool.gpus_per_node=2", "strategy.prefill_chunk=32", "attention_backend=sdpa",
        os.environ.get("PROBE_HW", "hardware=cuda"), "hardware.dtype=float32", "workload=tiny_mixed",
        "model.init_std=0.3", "strategy.kv_block=16", "check_reference=true", "launcher.timeout_s=60"]
VARIANTS = {"g2": ["strategy.pool.prefill_micro_batches=2"], "g1": ["strategy.pool.prefill_micro_batches=1"],
            "g2_eager_send": ["strategy.pool.prefill_micro_batches=2"],
            "g2_sync_all": ["strategy.pool.prefill_micro_batches=2"],
            "g2_no_graphs": ["strategy.pool.prefill_micro_batches=2", "strategy.cuda_graphs=false"]}


def main():
    name = sys.argv[1]
    rec = launch(BASE + VARIANTS[name], pathlib.Path(tempfile.mkdtemp()))
    c = rec.get("reference_check") or {}
    steps = [round(s["max_abs"], 4) for s in c.get("per_step", [])]
    print(name, os.environ.get("PROBE_VARIANT"), rec["status"], "passed", c.get("passed"), "max_rel",
          c.get("max_rel_logit_error"), "per_step", steps,
          "flips", [(f["sequence"], f["step"]) for f in c.get("argmax_flips", [])][:6], (rec.get("error") or "")[-300:],
          flush=True)


if __name__ == "__main__":
    main()
