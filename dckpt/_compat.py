"""The places where dckpt leans on parts of ``distributed`` that are not its public API.

Each is here, and only here, so that a distributed release that changes one of them
breaks one function with a docstring saying what it needs and why, not code spread
over the cluster and predict layers. Checked against distributed 2026.8.

- :func:`actor_instance`, :func:`set_actor_instance`: a worker's actors live in
  ``worker.state.actors`` (key → object). dckpt keeps each worker's node store there,
  so that actor proxies reach it, and finds a batch scorer there, so that a batch is
  scored by the object itself instead of travelling through a proxy.
- :func:`actor_proxy`: an ``Actor`` proxy built by hand for an object that no task
  created waits on ``proxy._future`` before each call, forever when the worker is
  unreachable; the future is cleared so that calls fail with the comm's own error.
- :func:`tcp_stream`: the tornado ``IOStream`` under a TCP or TLS comm
  (``TCP.stream``), which transfers write chunk bytes to and read them from directly
  (see :func:`dckpt.cluster._wire.raw_stream` for why); :func:`plain_tcp_socket`, its socket when
  no TLS wraps it, which a sender hands file bytes to with ``os.sendfile``.
- :func:`process_worker`: the worker of this process outside a task (``Worker._instances``):
  a task's result is pickled on the event loop or a comm thread, where
  ``get_worker()`` knows no worker.
"""

from __future__ import annotations

import socket
from typing import Any

from dask.typing import Key
from distributed import Client, Worker, get_worker
from distributed.actor import Actor
from distributed.comm import Comm
from distributed.comm.tcp import TCP
from tornado.iostream import IOStream, SSLIOStream

__all__ = ["actor_instance", "actor_proxy", "process_worker", "plain_tcp_socket", "set_actor_instance",
           "tcp_stream"]


def actor_instance(worker: Worker, key: Key) -> Any:
    """The actor object held by ``worker`` under ``key``, or None."""
    return worker.state.actors.get(key)


def set_actor_instance(worker: Worker, key: str, instance: object) -> None:
    """Let ``worker`` hold ``instance`` as an actor under ``key`` (proxies reach it)."""
    worker.state.actors[key] = instance


def actor_proxy(cls: type, worker_address: str, key: str, client: Client | None = None) -> Actor:
    """A proxy for the actor ``key`` of class ``cls`` on the worker at ``worker_address``.

    Calls go through ``client`` when given, else through this worker's connections (on
    a worker) or the default client. No task made the actor: there is no future to
    wait for before a call.
    """
    if client is None:
        proxy = Actor(cls, worker_address, key)
    else:
        with client.as_current():  # the proxy binds to the current client when created
            proxy = Actor(cls, worker_address, key)
    proxy._future = None
    return proxy


def tcp_stream(comm: Comm) -> IOStream | None:
    """The TCP (or TLS) stream under ``comm``, or None for other comms."""
    return comm.stream if isinstance(comm, TCP) and comm.stream is not None else None


def plain_tcp_socket(comm: Comm) -> socket.socket | None:
    """The socket under a TCP comm without TLS (``IOStream.socket``), or None."""
    stream = tcp_stream(comm)
    if stream is None or isinstance(stream, SSLIOStream):
        return None
    sock: socket.socket = stream.socket
    return sock


def process_worker() -> Worker | None:
    """This process's worker: the one running the current task, else the only one.

    None in a process with no running worker, or several (a ``LocalCluster`` with
    ``processes=False``), where which one is meant cannot be told.
    """
    try:
        return get_worker()
    except ValueError:
        pass
    workers = [w for w in list(Worker._instances) if w.status.name == "running"]
    return workers[0] if len(workers) == 1 else None
