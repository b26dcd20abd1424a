"""Helpers of the node-cluster fixtures (tests/conftest.py): process bookkeeping."""

from __future__ import annotations

import subprocess

import psutil

from dckpt.cluster import NodeCluster

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
