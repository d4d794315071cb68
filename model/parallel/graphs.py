"""A decode step as a program of compute segments and eager message operations, run eagerly or captured.

An engine writes its step once, against a program:
    prog.seg(fn)     compute (kernels, TP collectives): graph-capturable
    prog.eager(fn)   what must run on the host every step: point-to-point messages whose peers do not capture,
                     waits on them
`EagerProgram` runs each call as it comes. `GraphedProgram` captures each run of consecutive segments into one
CUDA graph (all sharing one memory pool) and records the eager operations between them; `replay()` then runs the
step as graph replays and those operations in order. Tensors created while capturing stay the graphs' static
inputs and outputs, so the eager operations recorded with them keep pointing at the right memory.

Capture only after an eager run of the same step: NCCL communicators, Triton kernels and cuBLAS handles exist
by then. `thread_local`: the NCCL watchdog thread may query its events while this thread captures.
"""
from __future__ import annotations

import torch


class EagerProgram:
    def seg(self, fn):
        fn()

    def eager(self, fn):
        fn()


class GraphedProgram:
    def __init__(self, stats):
        self.stats = stats  # model/parallel/tp.CommStats: collectives inside a graph count on each replay
        self.items, self.pending, self.pool = [], [], None

    def seg(self, fn):
        self.pending.append(fn)

    def eager(self, fn):
        self._flush()
        self.items.append((None, fn))

    def finish(self) -> "GraphedProgram":
        self._flush()
        return self

    def _flush(self):
        if not self.pending:
            return
        before = self.stats.copy()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            for fn in self.pending:
                fn()
        self.pool = graph.pool()
        self.items.append((graph, self.stats.since(before)))
        self.stats.bytes, self.stats.ops = before.bytes, before.ops  # in place: the modules hold this object
        self.pending = []

    def replay(self):
        for graph, item in self.items:
            if graph is None:
                item()
            else:
                graph.replay()
                self.stats.merge(item)
