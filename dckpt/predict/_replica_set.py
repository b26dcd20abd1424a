"""The replicas of a deployment, seen from the driver: start, route, replace, stop.

Driver side. Three kinds of threads meet here, under one lock (``ReplicaSet._cond``):

- callers of :meth:`ReplicaSet.run` (any thread: the user's, the HTTP server's pool)
  pick the least busy replica, wait for its answer, and try another replica when it
  is lost;
- the watcher thread (``dckpt-replicas-...``) asks the scheduler every
  ``dckpt.predict.deployment.check-interval`` which workers are alive, retires the
  replicas of workers that left, and starts replicas in empty slots;
- the client's event loop runs the calls themselves (:func:`_call_actor`).

Why calls do not go through ``distributed.actor.Actor`` proxies: a proxy whose worker
is unreachable waits for the actor's task to be computed again, and a task pinned to
a dead worker never is, so the call would hang. Here a call to a lost replica fails
(the connection drops, or the watcher cancels it) and the request moves on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import dask.config
import distributed
from dask.utils import parse_timedelta
from distributed.protocol.serialize import to_serialize

from dckpt.cluster import worker_nodes
from dckpt.errors import ReplicaUnavailableError
from dckpt.predict._replica_actor import PredictorReplica
from dckpt.predict._routing import choose_workers, least_busy

logger = logging.getLogger(__name__)

__all__ = ["Replica", "ReplicaSet"]


class _ReplicaLostError(Exception):
    """A call could not reach its replica (private: the request tries another one)."""


@dataclass(eq=False)
class Replica:
    """The driver's record of one running replica (an actor on one worker)."""

    slot: int
    address: str
    node_id: str
    future: distributed.Future
    in_flight: int = 0
    served: int = 0
    last_used: float = 0.0
    retired: bool = False
    calls: set[concurrent.futures.Future[Any]] = field(default_factory=set)


def _release(future: distributed.Future) -> None:
    try:
        future.release()
    except Exception:  # the user closed the client first: nothing left to release
        logger.debug("Releasing %s failed", future.key, exc_info=True)


def _settings() -> tuple[float, float, int]:
    """check-interval, start-timeout (seconds), max-attempts."""
    prefix = "dckpt.predict.deployment."
    return (
        parse_timedelta(dask.config.get(prefix + "check-interval"), default="s"),
        parse_timedelta(dask.config.get(prefix + "start-timeout"), default="s"),
        int(dask.config.get(prefix + "max-attempts")),
    )


async def _call_actor(client: distributed.Client, replica: Replica, method: str,
                      *args: Any) -> Any:
    """Run ``method(*args)`` on the replica's actor; runs on the client's event loop.

    Straight to the worker when the client talks to workers directly, else through
    the scheduler, as ``distributed.actor.Actor`` does.
    """
    msg: dict[str, Any] = {"function": method, "actor": replica.future.key,
           "args": [to_serialize(a) for a in args], "kwargs": {}}
    if client.direct_to_workers:
        response = await client.rpc(replica.address).actor_execute(**msg)
    else:
        response = await client.scheduler.proxy(
            msg={"op": "actor_execute", **msg}, worker=replica.address
        )
    if response["status"] != "OK":
        raise response["exception"]
    return response["result"]


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


class ReplicaSet:
    """``num_replicas`` slots, each holding a running replica or waiting for one.

    Parameters
    ----------
    client
        A synchronous client of the cluster.
    payload
        What every replica is made from (see :class:`PredictorReplica`).
    num_replicas
        How many slots.
    holders
        Given ``{address: node id}`` of the workers alive, the nodes that hold the
        checkpoint, best first: replicas go there first.

    Raises
    ------
    ValueError
        Fewer workers are alive than ``num_replicas``.
    Exception
        Whatever the predictor's ``from_checkpoint`` raised on a worker.
    """

    _client: distributed.Client
    _loop: asyncio.AbstractEventLoop
    _payload: bytes
    _holders: Callable[[dict[str, str]], list[str]] | None
    _slots: list[Replica | None]
    _starting: dict[int, str]
    _errors: dict[int, str]
    _cond: threading.Condition
    _closed: bool
    _stop: threading.Event
    _wake: threading.Event
    _watcher: threading.Thread
    _token: str
    _generation: itertools.count[int]

    def __init__(
        self,
        client: distributed.Client,
        payload: bytes,
        num_replicas: int,
        holders: Callable[[dict[str, str]], list[str]] | None = None,
    ) -> None:
        if client.asynchronous or client.loop is None:
            raise ValueError(f"{client!r} is asynchronous; a deployment needs a "
                             "synchronous client, whose event loop runs in a thread")
        self._client = client
        self._loop = client.sync(_running_loop)  # where the calls to replicas run
        self._payload = payload
        self._holders = holders
        self._slots = [None] * num_replicas
        self._starting, self._errors = {}, {}
        self._cond = threading.Condition()
        self._closed = False
        self._stop, self._wake = threading.Event(), threading.Event()
        self._token = uuid.uuid4().hex[:8]
        self._generation = itertools.count()
        alive = set(client.nthreads())
        if len(alive) < num_replicas:
            raise ValueError(
                f"{num_replicas} replicas need {num_replicas} workers (one each); "
                f"{len(alive)} are alive"
            )
        failures = self._start(range(num_replicas), alive)
        if failures:
            self.close()
            raise failures[0]
        self._watcher = threading.Thread(
            target=self._watch, name=f"dckpt-replicas-{self._token}", daemon=True
        )
        self._watcher.start()

    # -- requests (any thread) --------------------------------------------------------

    def run(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on the least busy replica; another one if it is lost.

        Raises
        ------
        ReplicaUnavailableError
            No replica became ready in time, every replica tried was lost, or the set
            is closed.
        """
        _, start_timeout, max_attempts = _settings()
        lost: _ReplicaLostError | None = None
        for _ in range(max(1, max_attempts)):
            replica = self._acquire(time.monotonic() + start_timeout)
            try:
                return self._call(replica, method, *args)
            except _ReplicaLostError as e:
                lost = e
                self._retire(replica, str(e))
        raise ReplicaUnavailableError(
            f"{max_attempts} replicas were tried in turn and each was lost "
            f"(dckpt.predict.deployment.max-attempts); the last one: {lost}"
        ) from lost

    def _acquire(self, deadline: float) -> Replica:
        with self._cond:
            while True:
                if self._closed:
                    raise ReplicaUnavailableError("the deployment is closed")
                replica = least_busy(r for r in self._slots if r is not None)
                if replica is not None:
                    replica.in_flight += 1
                    replica.last_used = time.monotonic()
                    return replica
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ReplicaUnavailableError(
                        "no replica became ready within dckpt.predict.deployment."
                        f"start-timeout; {self._why_empty()}"
                    )
                self._wake.set()  # have the watcher fill the slots now
                self._cond.wait(remaining)

    def _call(self, replica: Replica, method: str, *args: Any) -> Any:
        call = asyncio.run_coroutine_threadsafe(
            _call_actor(self._client, replica, method, *args), self._loop
        )
        with self._cond:
            replica.calls.add(call)
            if replica.retired:  # retired between _acquire and now: its calls are off
                call.cancel()
        try:
            answer = call.result()
        except concurrent.futures.CancelledError as e:
            raise _ReplicaLostError(
                f"replica {replica.slot} on {replica.address} was retired") from e
        except OSError as e:  # CommClosedError, refused or timed-out connections
            raise _ReplicaLostError(
                f"replica {replica.slot} on {replica.address} could not be reached: {e}"
            ) from e
        finally:
            with self._cond:
                replica.calls.discard(call)
                replica.in_flight -= 1
        with self._cond:
            replica.served += 1
        return answer

    # -- the set's state -------------------------------------------------------------

    def states(self) -> list[dict[str, Any]]:
        """One dict per slot: ``state`` ("ready", "starting", "empty" or "closed"),
        and ``worker``, ``node``, ``in_flight``, ``served`` or ``error`` as known."""
        with self._cond:
            out: list[dict[str, Any]] = []
            for slot, replica in enumerate(self._slots):
                if replica is not None:
                    out.append({"slot": slot, "state": "ready", "worker": replica.address,
                                "node": replica.node_id, "in_flight": replica.in_flight,
                                "served": replica.served})
                elif slot in self._starting:
                    out.append({"slot": slot, "state": "starting",
                                "worker": self._starting[slot]})
                else:
                    out.append({"slot": slot, "state": "closed" if self._closed else "empty",
                                "error": self._errors.get(slot)})
            return out

    def _why_empty(self) -> str:
        reasons = [f"slot {s}: {self._errors.get(s, 'starting')}"
                   for s, r in enumerate(self._slots) if r is None]
        return "; ".join(reasons) or "every slot is busy"

    def _retire(self, replica: Replica, reason: str) -> None:
        """Take ``replica`` out of service: its calls in flight are cancelled (their
        requests move on), its actor is released, the watcher fills its slot."""
        with self._cond:
            if replica.retired:
                return
            replica.retired = True
            if self._slots[replica.slot] is replica:
                self._slots[replica.slot] = None
            self._errors[replica.slot] = reason
            calls = list(replica.calls)
        for call in calls:
            call.cancel()
        _release(replica.future)  # the worker, if it still runs, drops the actor
        if not self._closed:
            logger.warning("Replica %d on %s (node %s) retired: %s; starting another",
                           replica.slot, replica.address, replica.node_id, reason)
        self._wake.set()

    def close(self) -> None:
        """Retire every replica and stop the watcher; requests waiting get
        :class:`ReplicaUnavailableError`. Safe to call more than once."""
        with self._cond:
            self._closed = True
            replicas = [r for r in self._slots if r is not None]
            self._cond.notify_all()
        self._stop.set()
        self._wake.set()
        watcher = getattr(self, "_watcher", None)
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join()
        for replica in replicas:
            self._retire(replica, "the deployment is closed")

    # -- the watcher thread ------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            interval, _, _ = _settings()
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._check()
            except Exception:
                if not self._stop.is_set():  # the client may be closing under us
                    logger.warning("Checking the replicas failed; trying again in %.1f s",
                                   interval, exc_info=True)

    def _check(self) -> None:
        alive = set(self._client.nthreads())
        with self._cond:
            gone = [r for r in self._slots if r is not None and r.address not in alive]
        for replica in gone:
            self._retire(replica, f"its worker {replica.address} left the cluster")
        with self._cond:
            empty = [slot for slot, r in enumerate(self._slots) if r is None]
        if empty:
            self._start(empty, alive)

    def _start(self, slots: Iterable[int], alive: set[str]) -> list[BaseException]:
        """Start replicas in ``slots`` on free workers among ``alive``; returns the
        errors of those that failed (their slots stay empty, the reason recorded)."""
        slots = list(slots)
        with self._cond:
            taken = [r.address for r in self._slots if r is not None]
        nodes = self._nodes_of(alive)
        preferred = self._holders(nodes) if self._holders is not None else []
        seats = choose_workers(len(slots), nodes, taken, preferred)
        failures: list[BaseException] = []
        for slot in slots[len(seats):]:
            failures.append(ReplicaUnavailableError(
                "no free worker: every live worker holds a replica"))
            self._record_error(slot, str(failures[-1]))
        started: dict[int, tuple[str, str, distributed.Future]] = {}
        for slot, (address, node_id) in zip(slots, seats):
            key = f"dckpt-replica-{self._token}-s{slot}-g{next(self._generation)}"
            future = self._client.submit(
                PredictorReplica, self._payload, actor=True, key=key, pure=False,
                workers=[address], allow_other_workers=False,
            )
            started[slot] = (address, node_id, future)
            with self._cond:
                self._starting[slot] = address
        self._wait_started(started)
        for slot, (address, node_id, future) in started.items():
            error = self._failure_of(future, address)
            with self._cond:
                del self._starting[slot]
                if error is None and not self._closed:
                    self._slots[slot] = Replica(slot, address, node_id, future)
                    self._errors.pop(slot, None)
                    self._cond.notify_all()
                    logger.info("Replica %d ready on %s (node %s)", slot, address, node_id)
                    continue
            self._record_error(slot, f"failed to start on {address}: {error}")
            _release(future)
            if error is not None:
                failures.append(error)
        return failures

    def _wait_started(self, started: dict[int, tuple[str, str, distributed.Future]]) -> None:
        """Until every new actor is up or failed, its worker left, the start-timeout
        passed or the set closed."""
        interval, start_timeout, _ = _settings()
        deadline = time.monotonic() + start_timeout
        next_check = time.monotonic() + interval
        pending = {slot for slot, (_, _, f) in started.items() if not f.done()}
        while pending and time.monotonic() < deadline and not self._stop.wait(0.02):
            pending = {slot for slot in pending if not started[slot][2].done()}
            if pending and time.monotonic() >= next_check:  # a task pinned to a dead
                alive = set(self._client.nthreads())  # worker would wait for ever
                pending = {slot for slot in pending if started[slot][0] in alive}
                next_check = time.monotonic() + interval

    def _failure_of(self, future: distributed.Future, address: str) -> BaseException | None:
        if future.status == "finished":
            return None
        if future.status == "error":
            error = future.exception()
            return error.with_traceback(future.traceback())
        if self._closed:
            return ReplicaUnavailableError("the deployment is closed")
        return ReplicaUnavailableError(
            f"the replica on {address} did not start within dckpt.predict.deployment."
            "start-timeout, or its worker left the cluster"
        )

    def _record_error(self, slot: int, message: str) -> None:
        """Remember why ``slot`` is empty; say it once, not at every check."""
        with self._cond:
            if self._closed or self._errors.get(slot) == message:
                return
            self._errors[slot] = message
        logger.warning("Replica slot %d stays empty for now: %s", slot, message)

    def _nodes_of(self, addresses: set[str]) -> dict[str, str]:
        """``{address: node id}`` of those of ``addresses`` still alive."""
        return {a: n for a, n in worker_nodes(self._client).items() if a in addresses}
