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

    def exchange(self, sends=(), recvs=(), send_group=None, recv_group=None) -> list:
        """sends, recvs: (peer rank, tensor, stats key) triples, on the given process groups (None: the world).
        Returns the works to wait on. Both ends of a message name the same group; a group per direction keeps
        messages going one way from queueing behind those coming back in one NCCL stream.

        Sends and receives go out as two batches, never one mixed batch: the peer posts the matching receives
        (sends) in a batch of its own, and NCCL leaves mixed and one-sided groupings of the same messages
        undefined (a mixed group can wait on its own receive before its send progresses; NVIDIA/nccl#1279)."""
        works = []
        for ops, op, group in ((sends, dist.isend, send_group), (recvs, dist.irecv, recv_group)):
            batch = [dist.P2POp(op, t, peer, group) for peer, t, _ in ops if t.numel()]
            for _, t, key in ops:
                if t.numel():
                    self.stats.add(key, t.nbytes)
            if batch:
                works += dist.batch_isend_irecv(batch)
        return works

    @staticmethod
    def wait(works: list) -> None:
        for w in works:
            w.wait()


def split_rows(buf: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive row ranges of a contiguous buffer: one region per peer, each contiguous."""
    return list(torch.split(buf, sizes, dim=0)) if sizes else []
