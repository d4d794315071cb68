"""The multi-node Slurm path for real: three emulated nodes on this machine (jobs/local_slurm.sh start DIR 3: each
slurmd in its own network, host-name and mount namespaces), jobs of 2-3 nodes whose ranks talk over the nodes'
addresses, every strategy kind checked against the reference, where each rank ran, and failures on the second node.
The sweeps submit from this process (tests/conftest.run_app); their jobs' tasks are new processes, as a user's are."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_app, slurm_cluster
from tests.test_slurm import requeued_run

pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None or shutil.which("ip") is None or os.geteuid() != 0,
    reason="needs Debian's slurm-wlm, munge and iproute2, as root (.ci/run installs them)")

NODES = 3
# Under pytest-xdist the tests run in two groups, each on one worker with its own cluster, one test after another:
# two chains of about the same length instead of one twice as long.
CHAIN_A, CHAIN_B = pytest.mark.xdist_group("slurm3a"), pytest.mark.xdist_group("slurm3b")


def _can_make_network_namespaces() -> bool:
    probe = f"fpbprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not _can_make_network_namespaces():  # a container without CAP_NET_ADMIN
        pytest.skip("cannot create network namespaces here (the emulated nodes need them)")
    state = tmp_path_factory.mktemp("slurm3")
    with slurm_cluster(state, NODES):
        yield state


def left_running(state: Path, within_s: float = 20.0) -> list[str]:
    """Processes still running on the emulated nodes, other than their slurmd, once `within_s` has passed (a job
    that has ended in Slurm's eyes may still be tearing its steps down)."""
    deadline = time.monotonic() + within_s
    while (left := _running_on_nodes(state)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _running_on_nodes(state: Path) -> list[str]:
    netns = dict(line.split("=", 1) for line in (state / "cluster.env").read_text().splitlines())["NETNS"]
    left = []
    for ns in netns.strip('"').split():
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:  # ended meanwhile
                continue
            if comm != "slurmd" and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                left.append(f"{ns}:{pid}:{comm}")
    return left


def by_strategy(records):
    return {r["config"]["strategy"]["name"]: r for r in records}


@CHAIN_B
def test_every_kind_across_two_nodes_matches_the_reference(cluster, tmp_path):
    proc, records = run_app(["-m", "launcher=slurm_local", "launcher.nodes=2", "workload=tiny_short",
                             "strategy=tp2_pp2,fa_pool_b2_p2,dcp_t2_k2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = by_strategy(records)
    assert set(runs) == {"tp2_pp2", "fa_pool_b2_p2", "dcp_t2_k2"}
    for name, rec in runs.items():
        assert rec["status"] == "ok", (name, rec.get("error"))
        assert rec["reference_check"]["passed"] and rec["reference_check"]["tokens_equal"], name
    # where every rank ran, by rank: blocks of the tasks per node, on different hosts
    assert runs["tp2_pp2"]["env"]["rank_hosts"] == ["node1", "node1", "node2", "node2"]
    assert runs["tp2_pp2"]["env"]["rank_slurm_node_ids"] == [0, 0, 1, 1]
    assert runs["fa_pool_b2_p2"]["env"]["rank_hosts"] == ["node1", "node1", "node2", "node2"]  # base | pool
    assert runs["dcp_t2_k2"]["env"]["rank_hosts"] == ["node1", "node2"]  # a KV shard per node
    assert all(r["env"]["hosts"] == sorted(set(r["env"]["rank_hosts"])) for r in records)


@CHAIN_A
def test_fa_pool_reduction_across_three_nodes_keeps_block_placement_under_a_cyclic_environment(cluster, tmp_path):
    # sbatch passes SLURM_DISTRIBUTION on to the job; the harness's srun asks for blocks, which the topology needs:
    # base TP2 on node1, the pool's two node-level reduction groups on node2 and node3
    proc, records = run_app(["-m", "launcher=slurm_local", "launcher.nodes=3", "workload=tiny_long",
                             "strategy=fa_pool_b2_p4"], tmp_path, env={"SLURM_DISTRIBUTION": "cyclic"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = records
    assert rec["status"] == "ok", rec.get("error")
    assert rec["reference_check"]["passed"] and rec["reference_check"]["tokens_equal"]
    assert rec["env"]["rank_hosts"] == ["node1", "node1", "node2", "node2", "node3", "node3"]
    assert rec["env"]["rank_slurm_node_ids"] == [0, 0, 1, 1, 2, 2]
    assert rec["elasticity"], "the pool served long sequences"


@CHAIN_B
def test_failures_on_the_second_node_end_as_records_naming_their_cause(cluster, tmp_path):
    # the hung point first: the waiter waits for the jobs in submission order and starts a job's clock when it
    # finds the job started, so the failing points, which run meanwhile, have ended before their clocks start and
    # the limit can be short (15 s from the task's start marker, which it leaves with torch imported: past the
    # hung rank's model build, reference check and warm-up to its fault step on a loaded machine)
    proc, records = run_app(["-m", "launcher=slurm_local", "launcher.nodes=2", "strategy=tp2_pp2",
                             "workload=tiny_short", "fault.kind=hang,raise,kill", "fault.rank=2",
                             "launcher.timeout_s=15"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # every record written, then a non-zero exit
    runs = {r["config"]["fault"]["kind"]: r for r in records}
    raised, killed, hung = runs["raise"], runs["kill"], runs["hang"]
    # the cause first, on its node, whatever its peers raised when it went away
    assert raised["status"] == "failed"
    assert "rank 2 failed first: RuntimeError: injected fault: rank 2 raised" in raised["error"], raised["error"]
    assert "on node2 (Slurm node 1)" in raised["error"]
    assert killed["status"] == "failed" and "rank 2: no error written" in killed["error"], killed["error"]
    assert hung["status"] == "timeout" and "cancelled" in hung["error"], hung["error"]
    for rec in records:  # written by the submitter, yet naming the job and the nodes it ran on
        assert rec["env"]["slurm_job_id"] and rec["env"]["hosts"] == ["node1", "node2"], rec["env"]
    assert left_running(cluster) == []


@CHAIN_A
def test_a_requeued_two_node_job_ends_with_exactly_one_record(cluster, tmp_path):
    rec, restarts = requeued_run(["launcher.nodes=2", "strategy=tp2_pp2", "workload=tiny",
                                  "workload.output_tokens=100"], tmp_path)
    assert rec.status == "ok", rec.error
    assert restarts >= 1
    assert rec.env["rank_hosts"] == ["node1", "node1", "node2", "node2"]
    assert len(list(Path(tmp_path).rglob("result.json"))) == 1
    assert left_running(cluster) == []
