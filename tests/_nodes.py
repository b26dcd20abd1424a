"""Helpers of the node-cluster fixtures: starting an isolated cluster, a client with dckpt
installed, process bookkeeping."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from distributed import Client

from dckpt.cluster import NodeCluster, install, isolation_available

N_NODES = 2


@contextlib.contextmanager
def isolated_cluster(n_nodes: int, **kwargs: Any) -> Iterator[NodeCluster]:
    """An isolated NodeCluster of ``n_nodes`` (``kwargs`` as NodeCluster's), closed
    afterwards; skips the test where mount namespaces cannot be had: what the cluster
    tests prove needs nodes that share no disk."""
    if not isolation_available():
        pytest.skip("node isolation (mount namespaces) is not available here")
    with NodeCluster(n_nodes, isolate=True, **kwargs) as cluster:
        yield cluster


def installed_client(cluster: NodeCluster) -> Client:
    """A client of ``cluster`` (not the default one), with dckpt installed on it."""
    client = cluster.client(set_as_default=False)
    install(client)
    return client


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


def lines_until_ready(process: subprocess.Popen[str]) -> list[str]:
    """What a cluster command (``dckpt cluster``, the launcher) prints on stdout up to
    its "Press Ctrl-C" line, after which its cluster is ready; fewer if it exits."""
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    return lines
