"""Fixtures for tests that need real worker processes on simulated nodes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest
from distributed import Client

from dckpt.cluster import NodeCluster, install, isolation_available

N_NODES = 2


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie does not (PID 1 of a container may never
    reap the orphans it inherits)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def child_pids() -> set[int]:
    """Live processes started, directly or not, by this test process."""
    return {p.pid for p in psutil.Process().children(recursive=True) if alive(p.pid)}


def cluster_pids(cluster: NodeCluster) -> set[int]:
    """The cluster's scheduler and workers and every process they started.

    Other session fixtures (the moto server, multiprocessing's resource tracker) start
    processes of their own meanwhile, so "children of the test process" is too wide.
    """
    top = {n.pid for n in cluster.nodes}
    if cluster._state.scheduler is not None:
        top.add(cluster._state.scheduler.pid)
    pids = set(top)
    for pid in top:
        try:
            pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return pids


@pytest.fixture(scope="session")
def node_cluster() -> Iterator[NodeCluster]:
    """An isolated NodeCluster of two nodes, shared by the whole session.

    Tests that kill or restart a node leave every node running again. Skips where
    mount namespaces cannot be had: what these tests prove needs isolation.
    """
    if not isolation_available():
        pytest.skip("node isolation (mount namespaces) is not available here")
    cluster = NodeCluster(N_NODES, isolate=True)
    try:
        yield cluster
    finally:
        pids = cluster_pids(cluster)
        root = cluster.root
        cluster.close()
    # Nothing left behind: no processes, no files.
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(root)


@pytest.fixture(scope="session")
def node_client(node_cluster: NodeCluster) -> Client:
    """A client of :func:`node_cluster`; not the default client, so that tests
    elsewhere do not run their computations on it by accident."""
    return node_cluster.client(set_as_default=False)


@pytest.fixture(scope="module")
def nodes(node_cluster: NodeCluster, node_client: Client) -> tuple[str, str]:
    """The addresses of node 0's and node 1's workers, each with a store and the
    scheduler's registry installed."""
    install(node_client)
    return node_cluster.nodes[0].worker_address, node_cluster.nodes[1].worker_address
