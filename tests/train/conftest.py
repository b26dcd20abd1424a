"""Fixtures of the trainer tests: a stand-in checkpoint manager, an isolated cluster.

``FakeManager`` implements only what the trainer uses of ``CheckpointManager``
(``register``, ``latest_checkpoint``, ``best_checkpoint``, ``best_checkpoints``,
``close``), and records what it was given. It keeps every checkpoint and deletes none.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import distributed
import pytest
from distributed import Client

from dckpt import Checkpoint
from dckpt.cluster import NodeCluster
from tests._nodes import isolated_cluster
from tests._waiting import eventually

N_NODES = 3


class FakeManager:
    """Records registrations; ``on_register(checkpoint, metrics)`` runs after each."""

    def __init__(self, on_register: Callable[[Checkpoint, dict[str, Any]], None] | None = None):
        self.registered: list[tuple[Checkpoint, dict[str, Any]]] = []
        self.on_register = on_register
        self.closed = False
        self.thread_ids: set[int] = set()

    def register(self, checkpoint: Checkpoint, metrics: Mapping[str, Any]) -> None:
        self.thread_ids.add(threading.get_ident())
        self.registered.append((checkpoint, dict(metrics)))
        if self.on_register is not None:
            self.on_register(checkpoint, dict(metrics))

    @property
    def latest_checkpoint(self) -> Checkpoint | None:
        return self.registered[-1][0] if self.registered else None

    @property
    def best_checkpoint(self) -> Checkpoint | None:
        return self.latest_checkpoint

    @property
    def best_checkpoints(self) -> list[tuple[Checkpoint, dict[str, Any]]]:
        return list(self.registered)

    def close(self) -> None:
        self.closed = True



@contextlib.contextmanager
def node_1_killed_at(
    cluster: NodeCluster, client: Client, epoch: int
) -> Iterator[tuple[str, FakeManager]]:
    """``(event, manager)``: a :class:`FakeManager` that, once attempt 0 registers
    ``epoch``, kills node 1 (rank 1's: placement is round-robin over sorted node ids)
    in a thread, starts it again and then sets the ``distributed.Event`` named
    ``event``, which the ranks wait on. On exit the thread is joined and the event
    cleared."""
    event = f"test-kill-{uuid.uuid4().hex}"
    killer: list[threading.Thread] = []

    def kill_node_1_then_restart_it() -> None:
        cluster.kill_node(1)
        cluster.restart_node(1)
        distributed.Event(event, client=client).set()

    def on_register(checkpoint: Checkpoint, metrics: dict[str, Any]) -> None:
        if metrics["attempt"] == 0 and metrics["epoch"] == epoch and not killer:
            killer.append(threading.Thread(target=kill_node_1_then_restart_it))
            killer[0].start()

    try:
        yield event, FakeManager(on_register)
    finally:
        for thread in killer:
            thread.join(60)
        distributed.Event(event, client=client).clear()


@pytest.fixture(scope="module")
def train_cluster(request: pytest.FixtureRequest) -> Iterator[NodeCluster]:
    """An isolated NodeCluster of three nodes for one test module.

    A test that kills a node starts it again. Skips where mount namespaces cannot be
    had: the resume tests must not pass by reading another node's disk. A module
    sets ``THREADS_PER_WORKER`` for more than one thread per worker (a torch rank of
    a failed attempt may still be leaving while the new attempt's rank starts).
    """
    threads = getattr(request.module, "THREADS_PER_WORKER", 1)
    with isolated_cluster(N_NODES, threads_per_worker=threads) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def train_client(train_cluster: NodeCluster) -> Client:
    return train_cluster.client(set_as_default=False)


def _dckpt_train_names(dask_scheduler: Any) -> list[str]:
    queues = dask_scheduler.extensions["queues"].queues
    events = dask_scheduler.extensions["events"]._events
    return [name for name in [*queues, *events] if str(name).startswith("dckpt-train")]


@pytest.fixture
def client(train_client: Client) -> Iterator[Client]:
    """The module's client; afterwards, no queue or event of a run is left on the
    scheduler (a queue's release is a one-way message: give it a moment to land)."""
    yield train_client
    eventually(lambda: train_client.run_on_scheduler(_dckpt_train_names), lambda left: left == [],
               "every queue and event of the run to be released on the scheduler")
