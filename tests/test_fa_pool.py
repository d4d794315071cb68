"""FA Pool over gloo on CPU: correctness against the reference, and that the pool is real."""
import inspect

import pytest

import numpy as np

from model.parallel.block_table import BlockTable
from tests.conftest import launch

SHORT = [5, 9, 3, 12]  # stays below the threshold of 32 for all 9 output tokens
LONG = [40, 48, 33, 56]
MIXED = [24, 40, 17, 30]  # 40 is long from the start; 30 crosses the threshold mid-decode
HEAD_DIM, N_HEADS, LAYERS, TP = 16, 4, 2, 2


def fa_run(tmp_path, lens, pool=4, hierarchical=True, async_overlap=True, policy="proportional", mb=2, block=8,
           wavefront=False):
    return launch(["strategy=fa_pool_b2_p4", f"strategy.pool.size={pool}", f"strategy.world_size={TP + pool}",
                   f"strategy.pool.hierarchical={str(hierarchical).lower()}",
                   f"strategy.pool.async_overlap={str(async_overlap).lower()}", f"strategy.pool.policy={policy}",
                   f"strategy.pool.wavefront={str(wavefront).lower()}",
                   f"strategy.micro_batches={mb}", f"strategy.pool.block_size={block}",
                   f"workload.prompt_lens=[{','.join(map(str, lens))}]", "workload.output_tokens=9",
                   "workload.warmup_steps=1", "check_reference=true"], tmp_path)


@pytest.fixture(scope="module")
def fa_runs(tmp_path_factory):
    """fa_run with its records kept by their arguments (defaults filled in): tests that assert on the same run
    launch it once per worker (the xdist group SHARED keeps them on one)."""
    runs = {}

    def run(lens, **kw):
        args = inspect.signature(fa_run).bind(None, lens, **kw)
        args.apply_defaults()
        key = repr(sorted((k, v) for k, v in args.arguments.items() if k != "tmp_path"))
        if key not in runs:
            runs[key] = fa_run(tmp_path_factory.mktemp("fa_run"), lens, **kw)
        return runs[key]

    return run


SHARED = pytest.mark.xdist_group("fa_pool_long_hier")  # the all-long run of the defaults, asserted on twice


def assert_matches_reference(rec):
    assert rec["status"] == "ok", rec["error"]
    check = rec["reference_check"]
    assert check["passed"] and check["tokens_equal"], check
    assert check["max_abs_logit_error"] < 1e-4 and check["steps_compared"] == 9


def pool_ranks(rec):
    return [r for r in rec["ranks"] if r["role"] == "pool"]


def base_ranks(rec):
    return [r for r in rec["ranks"] if r["role"] == "base"]


CASES = {
    "all_short": dict(lens=SHORT),
    "all_long": dict(lens=LONG),
    "mixed_crossing_hier_async": dict(lens=MIXED),
    "mixed_flat_sync": dict(lens=MIXED, hierarchical=False, async_overlap=False),
    "mixed_hier_sync": dict(lens=MIXED, async_overlap=False),
    "long_flat_async_pool3": dict(lens=LONG, pool=3, hierarchical=False),
    "mixed_pool1": dict(lens=MIXED, pool=1),
    "mixed_pool2_one_microbatch": dict(lens=MIXED, pool=2, mb=1),
    # the next layer's micro-batch starts before this layer's others finish; 3 micro-batches of 4 rows: 2, 1, 1
    "mixed_hier_wavefront_mb3": dict(lens=MIXED, wavefront=True, mb=3),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=SHARED) if c == "all_long" else c for c in CASES])
def test_fa_pool_matches_reference_and_pool_is_real(case, fa_runs):
    kw = CASES[case]
    rec = fa_runs(**kw)
    assert_matches_reference(rec)
    lens = kw["lens"]
    long_at_end = {str(s) for s, n in enumerate(lens) if n + 8 > 32}
    last = [e for e in rec["elasticity"] if e["step"] != "finish"][-1]
    assert set(last["pool_ranks_per_seq"]) == long_at_end
    for r in base_ranks(rec):  # the base holds the short sequences' KV and none of the long ones'
        assert not set(map(str, r["kv_seqs"])) & long_at_end
        # its cache has rows only for the sequences that start short (+ one trash block), preallocated
        starts_short = sum(n <= 32 for n in lens)
        row_blocks = -(-min(max(lens) + 9, 32) // kw.get("block", 8))
        assert r["kv_allocated_bytes"] == (starts_short * row_blocks + 1) * r["pool_block_bytes"]
    for r in pool_ranks(rec):  # pool ranks hold no weights, only KV of sequences assigned to them
        assert r["weight_bytes"] == 0
        p = r["rank"] - TP
        assigned = {s for s, ranks in last["pool_ranks_per_seq"].items() if p in ranks}
        assert set(map(str, r["kv_seqs"])) == assigned
    # conservation: every block allocated was freed when the sequences finished
    finish = rec["elasticity"][-1]
    assert finish["step"] == "finish" and finish["blocks_held"] == 0
    assert finish["blocks_freed"] == last["blocks_held"]
    for r in pool_ranks(rec) + base_ranks(rec):
        assert r["blocks_allocated"] - r["blocks_freed"] == 0
    if case == "all_short":
        assert all(r["kv_bytes"] == 0 for r in pool_ranks(rec))
    if "crossing" in case:
        assert sum(e["blocks_migrated"] for e in rec["elasticity"] if e["step"] not in (0, "finish")) > 0
        # fa_pool_b2_p4 as the preset runs it (pool of 4, hierarchical, async): a breakdown per role, a utilization
        # per pool rank
        for role in ("base", "pool"):
            assert abs(sum(rec["breakdown"][role].values()) - 1) < 1e-9
        assert len(rec["pool_utilization"]) == 4


def expected_traffic(rec, hierarchical, gpus_per_node=2):
    """Bytes a base rank sends to / receives from the pool, from the shapes and the logged placement."""
    hl = N_HEADS // TP
    sent = recv = 0
    for e in rec["elasticity"]:
        if e["step"] in (0, "finish"):
            continue
        for ranks in e["pool_ranks_per_seq"].values():
            sent += LAYERS * (len(ranks) + 2) * hl * HEAD_DIM * 4  # q to each holder; new k, v to one
            sources = len({(TP + p) // gpus_per_node for p in ranks}) if hierarchical else len(ranks)
            recv += LAYERS * sources * hl * (HEAD_DIM + 1) * 4  # out + LSE back from each source
    return sent, recv


@pytest.mark.slow
@pytest.mark.parametrize("hierarchical", [pytest.param(True, marks=SHARED), False])
def test_bytes_per_role_equal_shapes(hierarchical, fa_runs):
    rec = fa_runs(LONG, hierarchical=hierarchical)
    assert_matches_reference(rec)
    sent, recv = expected_traffic(rec, hierarchical)
    for r in base_ranks(rec):
        assert r["comm_bytes"]["base_to_pool"] == sent
        assert r["comm_bytes"]["pool_to_base"] == recv
    pool = pool_ranks(rec)
    assert sum(r["comm_bytes"].get("from_base", 0) for r in pool) == TP * sent
    assert sum(r["comm_bytes"].get("pool_to_base", 0) for r in pool) == TP * recv
    if hierarchical:  # members' partials reach a leader inside the node
        assert sum(r["comm_bytes"].get("pool_to_pool", 0) for r in pool) > 0
    else:
        assert all("pool_to_pool" not in r["comm_bytes"] for r in pool)


@pytest.mark.slow
def test_pool_kv_per_rank_falls_with_pool_size(tmp_path):
    """All-long batch, policy `all`: each sequence spreads over the whole pool."""
    lens = [63, 63, 63, 63]  # 64 tokens after the first decode step, 71 after 8: 9 blocks of 8
    per_rank = {}
    for pool in (1, 2, 4):
        rec = fa_run(tmp_path / str(pool), lens, pool=pool, policy="all", hierarchical=False)
        assert_matches_reference(rec)
        per_rank[pool] = max(r["kv_bytes"] for r in pool_ranks(rec))
        assert all(r["kv_bytes"] == 0 for r in base_ranks(rec))
    block = 2 * LAYERS * N_HEADS * 8 * HEAD_DIM * 4
    total_blocks = 4 * 9
    for pool, held in per_rank.items():  # 36 blocks spread evenly: KV per pool rank = total / pool size
        assert held == total_blocks // pool * block


def test_block_table_places_widens_and_conserves():
    bt = BlockTable(batch=4, pool_size=4, max_ranks_per_seq=3, block_size=8, policy="proportional",
                    tokens_per_rank=16, me=1, slots=40, max_blocks_per_seq=12)
    new = bt.place(np.array([0]), np.array([20]))  # 3 blocks, ceil(20/16) = 2 ranks, dealt round-robin
    assert len(new) == 3 and bt.n_ranks[0] == 2 and sorted(bt.counts[0]) == [0, 0, 1, 2]
    bt.place(np.array([1]), np.array([40]))  # 5 blocks over 3 ranks (capped), least-loaded ranks first
    assert bt.n_ranks[1] == 3 and (bt.counts[1] > 0).sum() == 3
    bt.check()
    assert len(bt.grow(np.array([0]), np.array([24]))) == 0  # still fits in 3 blocks
    grown = bt.grow(np.array([0]), np.array([33]))  # a 5th block, and a 3rd rank from 33 tokens on
    assert len(grown) == 2 and bt.n_ranks[0] == 3
    assert bt.counts[0].max() - bt.counts[0][bt.counts[0] > 0].min() <= 1  # the new rank caught up
    bt.check()
    # local tokens: only the last block is partly filled
    tokens = bt.local_tokens(np.array([33, 40, 0, 0]))
    assert tokens[0].sum() == 33 and tokens[1].sum() == 40 and (tokens[2:] == 0).all()
    assert bt.free(np.array([0])) == 5 and bt.allocated - bt.freed == 5
    bt.place(np.array([2]), np.array([64]))  # freed slots of this rank are reused
    bt.check()
    used = bt.table[2, : bt.counts[2, 1]]
    assert used.max() < 8


def test_block_table_spreads_a_batch_placed_at_once():
    """1024 sequences placed in one call land evenly (as the paper's batch migrates at prefill)."""
    bt = BlockTable(batch=1024, pool_size=32, max_ranks_per_seq=32, block_size=256, policy="proportional",
                    tokens_per_rank=4096)
    bt.place(np.arange(1024), np.full(1024, 16384))
    assert bt.held.max() - bt.held.min() <= 1 and bt.held.sum() == 1024 * 64
    for _ in range(300):  # decode growth keeps it even
        pooled = np.arange(1024)
        bt.grow(pooled, np.full(1024, 16384 + 1 + _))
    bt.check()
    assert bt.held.max() / bt.held.mean() < 1.05


@pytest.mark.slow
# (1, 3, 16): two blocks a chunk over three pool ranks, so before a chunk a rank holds different numbers of the
# long rows' tokens, and each row's key length on that rank matters (dropping it fails this case alone)
# groups of the prefill (the last number): 2 = rows {12, 80} and {28, 48}, one long row each; 3 = {12, 80}, {28},
# {48}, so one group has no long row and sends the pool nothing; 5 = one group per row (no more than the batch's 4)
@pytest.mark.parametrize("tp,pool,chunk,hierarchical,groups", [(2, 2, 16, True, 1), (1, 3, 24, False, 1),
                                                               (1, 3, 16, False, 1), (2, 2, 0, False, 1),
                                                               (2, 2, 16, True, 2), (1, 3, 16, False, 3),
                                                               (2, 2, 16, False, 5)])
def test_prefill_writes_long_prompts_straight_into_pool_blocks(tp, pool, chunk, hierarchical, groups, tmp_path):
    """Prompts of 12-80 tokens, threshold 32, blocks of 8: the long prompts' K/V goes from the base to the pool
    chunk by chunk (nothing migrates after the prefill), and a long row's chunk attends over the pool's earlier
    chunks; logits and tokens are the plain model's (sharp init), whatever the groups of rows the prefill takes
    through the layers in wavefront order."""
    lens, layers, heads, dim, bs = [12, 80, 28, 48], 2, 4, 16, 8
    rec = launch(["strategy=fa_pool_b2_p4", f"strategy.tp={tp}", f"strategy.pool.size={pool}",
                  f"strategy.pool.max_size={pool}", f"strategy.world_size={tp + pool}", "strategy.pool.gpus_per_node=2",
                  f"strategy.pool.hierarchical={str(hierarchical).lower()}", f"strategy.prefill_chunk={chunk}",
                  f"strategy.pool.prefill_micro_batches={groups}",
                  "model.init_std=0.3", "workload=tiny_mixed", "check_reference=true"], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    check = rec["reference_check"]
    assert check["passed"] and check["tokens_equal"] and check["max_rel_logit_error"] < 1e-4, check
    prefill = rec["elasticity"][0]
    assert prefill["step"] == 0 and prefill["blocks_migrated"] == 0  # placed in the pool, not moved there
    # what one base rank sends the pool per generation: every block of the long prompts once (K and V, its heads),
    # and for each chunk after the first the long rows' queries to every pool rank
    long = [n for n in lens if n > 32]
    hl, padded = heads // tp, -(-max(lens) // bs) * bs
    step = chunk or padded
    kv = layers * 2 * sum(-(-n // bs) * bs for n in long) * hl * dim * 4
    q = layers * pool * sum(len(long) * min(step, padded - s) for s in range(step, padded, step)) * hl * dim * 4
    for r in base_ranks(rec):  # the bytes of the measured generation
        assert r["comm_bytes"]["prefill_to_pool"] == kv + q


@pytest.mark.parametrize("tp,pool", [(2, 2), (1, 3)])
def test_prefill_of_equal_prompts_in_chunks_matches_the_reference(tp, pool, tmp_path):
    """Four prompts of 64 tokens, all long, in chunks of 16: every chunk full, so the base attends with no length
    mask and each pool rank over its equal share of the earlier chunks with none either (the benchmark's case)."""
    rec = launch(["strategy=fa_pool_b2_p4", f"strategy.tp={tp}", f"strategy.pool.size={pool}",
                  f"strategy.pool.max_size={pool}", f"strategy.world_size={tp + pool}", "strategy.pool.gpus_per_node=4",
                  "strategy.pool.hierarchical=false", "strategy.prefill_chunk=16", "model.init_std=0.3",
                  "workload=tiny_mixed", "workload.prompt_lens=[64]", "check_reference=true"], tmp_path)
    assert rec["status"] == "ok", rec["error"]
    check = rec["reference_check"]
    assert check["passed"] and check["tokens_equal"] and check["max_rel_logit_error"] < 1e-4, check


def test_fa_pool_prefill_chunk_is_whole_pool_blocks():
    from harness.config import ConfigError
    from tests.conftest import cfg_object

    with pytest.raises(ConfigError, match="multiple of strategy.pool.block_size=8"):
        cfg_object(["strategy=fa_pool_b2_p4", "strategy.prefill_chunk=12"])
    assert cfg_object(["strategy=fa_pool_b2_p4", "strategy.prefill_chunk=16"]).strategy.prefill_chunk == 16


@pytest.mark.parametrize("async_overlap,wavefront", [(False, False), (True, False), (True, True)])
def test_base_unit_order_keeps_the_message_order_and_each_micro_batch_in_sequence(async_overlap, wavefront):
    from model.parallel.fa_pool_plan import base_unit_order

    layers, micro = 3, 3
    order = base_unit_order(layers, micro, async_overlap, wavefront)
    every = [(kind, layer, m) for kind in ("begin", "finish") for layer in range(layers) for m in range(micro)]
    assert sorted(order) == sorted(every)
    begins = [(layer, m) for kind, layer, m in order if kind == "begin"]
    assert begins == sorted(begins)  # the order the pool serves (and every rank posts) the messages in
    at = {event: i for i, event in enumerate(order)}
    for layer in range(layers):
        for m in range(micro):
            assert at["begin", layer, m] < at["finish", layer, m]
            if layer + 1 < layers:
                assert at["finish", layer, m] < at["begin", layer + 1, m]  # a micro-batch's layers in sequence
    # what each schedule overlaps: the next layer's first micro-batch starts before this layer's last one
    # finishes only in the wavefront; every micro-batch of a layer starts before the first finishes when async
    assert (at["begin", 1, 0] < at["finish", 0, micro - 1]) == wavefront
    assert (at["begin", 0, micro - 1] < at["finish", 0, 0]) == async_overlap


class _CaptureLikeProgram:
    """What GraphedProgram does with the Python of a step: segments run once, when the next eager operation
    flushes them (their kernels are what a replay repeats, never their Python); eager operations run at every
    replay only."""

    def __init__(self):
        self.pending, self.eager_ops = [], []

    def seg(self, fn):
        self.pending.append(fn)

    def eager(self, fn):
        self.finish()
        self.eager_ops.append(fn)

    def finish(self):
        for fn in self.pending:
            fn()
        self.pending = []
        return self

    def replay(self):
        for fn in self.eager_ops:
            fn()


@pytest.mark.parametrize("async_overlap,wavefront,micro", [(False, False, 1), (True, False, 2), (True, True, 2)])
def test_a_replayed_base_step_posts_and_waits_for_each_layers_own_unit(async_overlap, wavefront, micro):
    """On replay, each layer's post and arrive (eager, every step) must reach the unit that layer's captured begin
    made: its message and receive buffers. Before the units were keyed by layer, every layer found the last
    layer's unit (GPU decode wrong from the first step after prefill with CUDA graphs, right without)."""
    import torch

    from model.parallel.fa_pool_base_rank import FAPoolBaseRank

    log = []

    class Unit:
        def __init__(self, layer, rows):
            self.made = (layer, rows.start)

        def post(self):
            log.append(("post", *self.made))

        def arrive(self):
            log.append(("arrive", *self.made))

    class FakeBlock:
        def __init__(self, layer):
            self.layer = layer

        def begin(self, x, step):
            return Unit(self.layer, step.rows)

        def finish(self, x, unit):
            return x

    class Micro:
        def __init__(self, rows):
            self.rows, self.pooled = rows, True

    class Plan:
        def __init__(self, micro):
            self.micro, self.tensors = micro, {"cache_lens": torch.zeros(4, dtype=torch.long)}

        def __getitem__(self, name):
            return self.tensors[name]

    layers = 3
    engine = object.__new__(FAPoolBaseRank)  # only what _base_step reads
    engine.x, engine.ones, engine.tokens_in = torch.zeros(4, 1, 8), torch.ones(4, dtype=torch.long), torch.zeros(4)
    engine.embed = lambda tokens: torch.zeros(4, 1, 8)
    engine.blocks = [FakeBlock(layer) for layer in range(layers)]
    engine.plan = Plan([Micro(slice(m * 4 // micro, (m + 1) * 4 // micro)) for m in range(micro)])
    engine.async_overlap, engine.wavefront = async_overlap, wavefront
    engine._head = lambda: None
    program = engine._base_step(_CaptureLikeProgram()).finish()
    log.clear()
    program.replay()
    starts = [mp.rows.start for mp in engine.plan.micro]
    expected = {(kind, layer, s) for kind in ("post", "arrive") for layer in range(layers) for s in starts}
    assert len(log) == len(expected) and set(log) == expected, log
    for layer in range(layers):  # each unit posted before it is waited for
        for s in starts:
            assert log.index(("post", layer, s)) < log.index(("arrive", layer, s))


def test_pool_blocks_on_a_gpu_do_not_shrink_by_what_the_allocator_caches(monkeypatch):
    """A pool rank sizes its blocks at each generation from the device's free memory. Memory torch's allocator
    caches from the last generation counts as used on the device but is this rank's to use: the cap must come out
    the same, or a measured generation gets fewer blocks than the warm-up's and runs out."""
    import torch

    from model.parallel.fa_pool_pool_rank import FAPoolPoolRank

    gib = 2**30
    engine = object.__new__(FAPoolPoolRank)  # only what _pool_slots reads
    engine.batch, engine.block_size, engine.n_layers, engine.n_heads, engine.head_dim = 16, 256, 4, 32, 128
    engine.dtype, engine.device, engine.kv_memory_fraction = torch.bfloat16, torch.device("cuda"), 0.9
    block = 2 * 4 * 32 * 256 * 128 * 2

    def device(free, reserved, allocated):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (free, 141 * gib))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: allocated)

    engine.kv = None
    device(free=30 * gib, reserved=0, allocated=0)  # the first generation: little memory free, nothing cached yet
    first = engine._pool_slots(32768 + 256)
    assert first == int(30 * gib * 0.9) // block < 16 * 129  # capped by memory, not by the batch

    class Held:
        def nbytes(self):
            return first * block

    engine.kv = Held()
    # the next generation: the blocks held, and 2 GiB of the last prefill's temporaries cached by the allocator
    taken = first * block + 2 * gib
    device(free=30 * gib - taken, reserved=taken, allocated=first * block)
    assert engine._pool_slots(32768 + 256) == first
