"""NodeCluster: simulated nodes with their own ids and, isolated, their own disks."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from distributed import Client

import dckpt._node
from dckpt.cluster import (
    IsolationUnavailableWarning,
    NodeCluster,
    NodeInfo,
    _node_cluster,
    isolation_available,
)
from tests._nodes import N_NODES, alive, child_pids


def _write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return dckpt._node.node_id()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _on(client: Client, info: NodeInfo, func, *args):
    """Run ``func(*args)`` as a task pinned to the worker of one node."""
    return client.submit(func, *args, workers=[info.worker_address], pure=False).result()


def _start_sleeper() -> int:
    """Start a process that outlives the task, as user code on a worker might."""
    return subprocess.Popen(["sleep", "60"]).pid


def _force_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_node_cluster, "_probe_isolation", lambda: (None, "forced by the test"))


# -- the shared, isolated cluster -----------------------------------------------------


def test_each_worker_is_a_node_with_its_own_id(node_cluster, node_client):
    assert node_cluster.isolated
    assert [n.node_id for n in node_cluster.nodes] == [f"node-{i}" for i in range(N_NODES)]
    assert node_client.run(dckpt._node.node_id) == {
        n.worker_address: n.node_id for n in node_cluster.nodes
    }
    assert node_client.run(os.getpid) == {n.worker_address: n.pid for n in node_cluster.nodes}
    workers = node_client.scheduler_info()["workers"]
    assert {workers[n.worker_address]["name"] for n in node_cluster.nodes} == {
        n.node_id for n in node_cluster.nodes
    }


def test_isolated_nodes_see_their_storage_at_the_same_path(node_cluster, node_client):
    (root,) = {n.root for n in node_cluster.nodes}
    assert set(node_client.run(dckpt._node.node_root).values()) == {root}
    caches = node_client.run(dckpt._node.cache_directory)
    assert set(caches.values()) == {os.path.join(root, "cache")}
    assert len(caches) == N_NODES


def test_a_file_written_on_one_node_exists_only_there(node_cluster, node_client):
    node0, node1 = node_cluster.nodes[:2]
    path = os.path.join(node0.root, f"only-on-node-0-{uuid.uuid4().hex}")
    assert _on(node_client, node0, _write, path, "written on node 0") == "node-0"

    assert _on(node_client, node0, _read, path) == "written on node 0"
    assert _on(node_client, node1, _read, path) is None
    assert _read(path) is None  # the driver
    # Nor can node 1 reach it through node 0's backing folder.
    backing = os.path.join(node_cluster.root, "backing", "node-0", os.path.basename(path))
    assert _on(node_client, node1, _read, backing) is None


@pytest.mark.slow
def test_kill_node_removes_its_worker(node_cluster, node_client):
    victim = node_cluster.nodes[1]
    try:
        node_cluster.kill_node(1)
        assert victim.worker_address not in node_client.scheduler_info()["workers"]
        assert not alive(victim.pid)
        assert node_cluster.nodes[0].worker_address in node_client.scheduler_info()["workers"]
        node_cluster.kill_node(1)  # already dead: nothing to do
    finally:
        node_cluster.restart_node(1)


@pytest.mark.slow
def test_restart_node_finds_the_node_data_again(node_cluster, node_client):
    before = node_cluster.nodes[1]
    path = os.path.join(before.root, f"survives-restart-{uuid.uuid4().hex}")
    _on(node_client, before, _write, path, "before the crash")
    node_cluster.kill_node(1)

    after = node_cluster.restart_node(1)

    assert after == node_cluster.nodes[1]
    assert (after.node_id, after.root, after.isolated) == (before.node_id, before.root, True)
    assert (after.worker_address, after.pid) != (before.worker_address, before.pid)
    assert node_client.run(dckpt._node.node_id, workers=[after.worker_address]) == {
        after.worker_address: "node-1"
    }
    assert _on(node_client, after, _read, path) == "before the crash"
    assert _on(node_client, node_cluster.nodes[0], _read, path) is None


def test_node_index_out_of_range(node_cluster):
    with pytest.raises(IndexError, match="No node 5: this cluster has nodes 0 to 1"):
        node_cluster.kill_node(5)


# -- clusters of their own ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not isolation_available(), reason="node isolation is not available here")
def test_close_leaves_nothing_behind():
    # Processes of other clusters (node_cluster) may be there: they must stay untouched.
    before = child_pids()
    cluster = NodeCluster(1, isolate=True)
    client = cluster.client(set_as_default=False)
    started = child_pids() - before
    assert cluster.nodes[0].pid in started
    path = os.path.join(cluster.nodes[0].root, "f")
    assert client.submit(_write, path, "x").result() == "node-0"
    sleeper = client.submit(_start_sleeper, pure=False).result()
    assert sleeper in child_pids()

    cluster.close()

    assert child_pids() == before
    assert not any(alive(pid) for pid in started | {sleeper})
    assert not os.path.exists(cluster.root)
    assert client.status == "closed"
    cluster.close()  # twice is fine
    with pytest.raises(RuntimeError, match="is closed"):
        cluster.client()


@pytest.mark.slow
def test_without_isolation_it_warns_once_and_gives_distinct_roots(monkeypatch):
    _force_unavailable(monkeypatch)
    with pytest.warns(IsolationUnavailableWarning, match="forced by the test") as record:
        cluster = NodeCluster(2)
    with cluster, cluster.client(set_as_default=False) as client:
        assert len(record) == 1
        assert not cluster.isolated
        assert not any(n.isolated for n in cluster.nodes)
        roots = [n.root for n in cluster.nodes]
        assert roots == [os.path.join(cluster.root, f"node-{i}") for i in range(2)]
        by_address = {n.worker_address: n for n in cluster.nodes}
        assert client.run(dckpt._node.node_root) == {a: n.root for a, n in by_address.items()}
        assert client.run(dckpt._node.node_id) == {a: n.node_id for a, n in by_address.items()}
        # Not isolated: the driver sees what a node writes.
        path = os.path.join(roots[0], "visible")
        _on(client, cluster.nodes[0], _write, path, "x")
        assert _read(path) == "x"
    assert not os.path.exists(cluster.root)


def test_isolate_true_without_isolation_raises_before_starting_anything(monkeypatch):
    _force_unavailable(monkeypatch)
    before = child_pids()
    with pytest.raises(RuntimeError, match=r"isolate=True.*forced by the test.*isolate=None"):
        NodeCluster(1, isolate=True)
    assert child_pids() == before


@pytest.mark.slow
def test_a_failed_start_leaves_nothing_behind(tmp_path):
    before = child_pids()
    with pytest.raises(RuntimeError, match=r"(?s)worker of node-0 exited.*'lots'"):
        NodeCluster(1, isolate=False, root=str(tmp_path / "cluster"), memory_limit="lots")
    assert child_pids() == before
    # A root that the caller gave is kept, with the logs that explain the failure.
    assert "lots" in (tmp_path / "cluster" / "logs" / "node-0.log").read_text()


def test_invalid_node_count():
    with pytest.raises(ValueError, match="at least one node"):
        NodeCluster(0)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "cache", "tmp", "dask-worker-space"])
def test_invalid_shared_folder_names(name):
    before = child_pids()
    with pytest.raises(ValueError, match=r"shared_folders=\.\.\.\) got .*one folder name"):
        NodeCluster(1, isolate=False, shared_folders=[name])
    assert child_pids() == before


def test_shared_folders_need_isolation(monkeypatch):
    before = child_pids()
    with pytest.raises(ValueError, match=r"shared_folders=\['shared'\]\) needs isolated.*"
                                         r"isolate=False was given"):
        NodeCluster(1, isolate=False, shared_folders=["shared"])
    _force_unavailable(monkeypatch)
    with pytest.warns(IsolationUnavailableWarning), \
            pytest.raises(ValueError, match="isolation is not available here"):
        NodeCluster(1, shared_folders=["shared"])
    assert child_pids() == before
