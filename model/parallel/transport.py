"""Point-to-point messages of the FA Pool, batched: all sends and receives of one exchange posted together
(`dist.batch_isend_irecv`), at most one message per peer, with byte counts by kind of traffic.

On NCCL every rank must post matching exchanges in the same order per peer; the plan (fa_pool_plan.py) is
computed identically on every rank, which is what makes the orders agree.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.parallel.tp import CommStats


class Transport:
    def __init__(self, stats: CommStats):
        self.stats = stats

    def exchange(self, sends=(), recvs=()) -> list:
        """sends, recvs: (peer rank, tensor, stats key) triples. Returns the works to wait on."""
        ops = [dist.P2POp(dist.isend, t, peer) for peer, t, _ in sends if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, peer) for peer, t, _ in recvs if t.numel()]
        for _, t, key in (*sends, *recvs):
            self.stats.add(key, t.nbytes)
        return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(works: list) -> None:
        for w in works:
            w.wait()


def split_rows(buf: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive row ranges of a contiguous buffer: one region per peer, each contiguous."""
    return list(torch.split(buf, sizes, dim=0)) if sizes else []
