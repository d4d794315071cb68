"""A FA Pool decode step launches the same torch ops whatever the batch size or the number of KV blocks.

Four ranks over gloo (base TP2 + pool of 2, the pool one node with a leader): one decode step is counted with a
dispatch-mode counter on every rank, at batch 8 and 64, and at block size 4 and 32 with the same context.
"""
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from harness.launch import forkserver
from harness.strategies.fa_pool import FAPoolConfig, PoolConfig
from harness.measure import PhaseTimer
from model.config import ModelConfig

WORLD = 4


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _rank(rank, init, configs, out):
    from model.parallel.fa_pool import fa_pool_engine

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    for batch, block in configs:  # one engine per configuration, one after another in the same process group
        pool = PoolConfig(size=2, max_size=2, threshold=32, block_size=block, policy="proportional",
                          tokens_per_rank=16, hierarchical=True, async_overlap=True, gpus_per_node=2)
        strategy = FAPoolConfig(name="t", tp=2, micro_batches=2, world_size=WORLD, pool=pool)
        engine = fa_pool_engine(ModelConfig(), strategy, rank, WORLD, torch.device("cpu"), torch.float32, "math",
                                PhaseTimer("cpu"))
        lens = torch.tensor([40, 10] * (batch // 2))  # half pooled, half on the base, in every micro-batch
        tok = engine.synthetic_prefill(lens, max_len=64, seed=0)
        tok = engine.decode(tok)  # a first step: every peer has spoken once
        with OpCounter() as counter:
            engine.decode(tok)
        torch.save(dict(counter.ops), f"{out}/b{batch}_bs{block}_rank{rank}.pt")
        del engine
        dist.barrier()
    dist.destroy_process_group()


def count_ops(tmp_path, configs):
    """The ops of one decode step on every rank, per (batch, block size): {config: [Counter per rank]}. The four
    ranks count every configuration in one process group rather than starting four processes per configuration."""
    out = tmp_path / "counts"
    out.mkdir()
    # forked from a forkserver that has torch imported, as the local launcher's ranks are (harness/launch.py),
    # rather than spawned: four imports of torch otherwise
    forkserver()
    mp.start_processes(_rank, args=(f"file://{out}/store", configs, str(out)), nprocs=WORLD, join=True,
                       start_method="forkserver")
    return {(b, bs): [Counter(torch.load(out / f"b{b}_bs{bs}_rank{r}.pt")) for r in range(WORLD)] for b, bs in configs}


@pytest.mark.slow
def test_decode_step_ops_do_not_grow_with_batch_or_blocks(tmp_path):
    counts = count_ops(tmp_path, [(8, 4), (64, 4), (8, 32)])
    small, large_batch, large_blocks = counts[8, 4], counts[64, 4], counts[8, 32]
    for rank in range(WORLD):
        assert sum(small[rank].values()) > 20, small[rank]  # the counter sees the step's work
        assert small[rank] == large_batch[rank], (rank, small[rank] - large_batch[rank], large_batch[rank] - small[rank])
        assert small[rank] == large_blocks[rank], (rank, small[rank] - large_blocks[rank], large_blocks[rank] - small[rank])
