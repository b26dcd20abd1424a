"""How reports travel from the ranks to the driver, and a stop signal the other way.

The channel is a ``distributed.Queue`` named after the run. It lives on the
scheduler, so it survives the death of any worker: a report that was queued before
its rank died is still read by the driver, and a report is queued (``report`` returns)
only once the scheduler holds it. Pub/sub was the other candidate and is not used:
``distributed.Pub`` drops messages published before it has learnt of a subscriber,
and a restarted rank would have to wait for that handshake before its first report.

A report is pickled on the worker (cloudpickle: metrics may hold any object) and
travels as bytes, which the queue carries as they are. Pickling on the worker is what
turns a directory checkpoint into a node reference, so its bytes stay on its node.

Workers put with the scheduler's ``queue_put`` handler directly rather than through a
``distributed.Queue`` object: each ``Queue`` made on a worker counts a reference to
the queue that only that worker can release, and a worker that dies never does, so
the scheduler would keep every run's queue forever. The driver holds the only
reference and releases it in :meth:`ReportChannel.close`.

The stop signal is one ``distributed.Event`` per attempt: the driver sets it when it
gives up on an attempt; each rank checks it in every ``report`` (and a rank that waits
on its peers polls it, :func:`dckpt.train.stop_requested`). Once the run is over its
events are released with its queue, so a queue that is gone also reads as stopped. A
rank that never reports or polls again keeps running until it returns (Dask cannot
interrupt a running task), and keeps its worker's thread busy meanwhile.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import cloudpickle
import distributed

from dckpt.train._session import Report

logger = logging.getLogger(__name__)

__all__ = ["ReportChannel", "WorkerChannel"]


@dataclass(frozen=True)
class WorkerChannel:
    """The rank's end: picklable, handed to each rank task. Runs in the task thread."""

    queue: str
    stop_event: str

    def send(self, report: Report) -> None:
        """Queue ``report`` on the scheduler; returns once it is there."""
        payload = cloudpickle.dumps(report)
        client = distributed.get_client()
        client.sync(client.scheduler.queue_put, name=self.queue, data=payload)

    def stop_requested(self) -> bool:
        """Whether the driver has stopped this attempt, or the whole run is over.

        A rank still running when its run ended (Dask cannot interrupt a task) finds
        no stop event: the driver released the run's events with its queue. So a
        queue that is gone means stopped too; else such a rank, waiting for a peer
        that died, would wait forever.
        """
        client = distributed.get_client()
        if distributed.Event(self.stop_event, client=client).is_set():
            return True
        try:
            client.sync(client.scheduler.queue_qsize, name=self.queue)
        except KeyError:
            return True
        return False


class ReportChannel:
    """The driver's end of a run's reports. Used from the driver's thread only."""

    _client: distributed.Client
    _queue: distributed.Queue
    _prefix: str
    _stopped: list[str]

    def __init__(self, client: distributed.Client) -> None:
        self._client = client
        self._prefix = f"dckpt-train-{uuid.uuid4().hex}"
        self._queue = distributed.Queue(f"{self._prefix}-reports", client=client)
        self._stopped = []

    def for_attempt(self, attempt: int) -> WorkerChannel:
        """The end to hand to the ranks of ``attempt``."""
        return WorkerChannel(self._queue.name, f"{self._prefix}-stop-{attempt}")

    def receive(self) -> list[Report]:
        """Every report queued so far, in the order queued; does not wait."""
        payloads = self._queue.get(batch=True)
        return [cloudpickle.loads(payload) for payload in payloads]

    def stop(self, attempt: int) -> None:
        """Tell the ranks of ``attempt`` to stop at their next report."""
        name = self.for_attempt(attempt).stop_event
        distributed.Event(name, client=self._client).set()
        self._stopped.append(name)

    def close(self) -> None:
        """Release the queue and the stop events on the scheduler."""
        if self._client.status != "running":
            return
        for name in self._stopped:
            # Clearing an event nobody waits on deletes it on the scheduler.
            distributed.Event(name, client=self._client).clear()
        self._stopped.clear()
        self._queue.close()
