"""One attempt's ranks on the cluster: started together, watched together, stopped
together.

Driver side. Each rank is a task pinned to one worker (``workers=[address]``, no
other worker allowed, ``pure=False``). A task pinned to a worker that died would wait
for it forever, so :meth:`RankGroup.failure` also checks that every unfinished rank's
worker is still known to the scheduler (``client.nthreads()``, a small request), each
time the trainer polls (``dckpt.train.poll-interval``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence

import distributed

from dckpt.errors import WorkerLostError
from dckpt.train._datasets import ShardArgument
from dckpt.train._rank import RankSpec, run_rank

logger = logging.getLogger(__name__)

__all__ = ["RankGroup"]


class RankGroup:
    """The running ranks of one attempt.

    Parameters
    ----------
    client
        The driver's client.
    specs
        One spec per rank, in rank order; each rank runs on ``spec.placement.worker``.
    resources
        Dask worker resources each rank's task claims (``ScalingConfig``'s, e.g.
        ``{"GPU": 1}``); None or empty for none.
    datasets
        Each rank's shard argument (:func:`dckpt.train._datasets.shard_datasets`),
        in rank order; its futures become the partitions by the time the rank runs.
    """

    _client: distributed.Client
    _specs: list[RankSpec]
    _futures: list[distributed.Future]

    def __init__(
        self,
        client: distributed.Client,
        specs: Sequence[RankSpec],
        resources: Mapping[str, float] | None = None,
        datasets: Sequence[ShardArgument] | None = None,
    ) -> None:
        self._client = client
        self._specs = list(specs)
        token = uuid.uuid4().hex[:8]
        self._futures = [
            client.submit(
                run_rank, spec,
                None if datasets is None else datasets[spec.placement.world_rank],
                workers=[spec.placement.worker], allow_other_workers=False,
                resources=dict(resources) if resources else None, pure=False, key=f"dckpt-train-rank-{spec.run_name}-{token}-"
                f"a{spec.attempt}-r{spec.placement.world_rank}",
            )
            for spec in self._specs
        ]

    def done(self) -> bool:
        """Whether every rank has returned."""
        return all(future.status == "finished" for future in self._futures)

    def failure(self) -> BaseException | None:
        """Why the attempt failed, or None while it has not.

        A rank's own exception (with its remote traceback), else a
        :class:`WorkerLostError` for an unfinished rank whose worker left the cluster.
        """
        for spec, future in zip(self._specs, self._futures):
            if future.status == "error":
                error = future.exception()
                return error.with_traceback(future.traceback())
            if future.status in ("cancelled", "lost"):
                return RuntimeError(
                    f"the task of rank {spec.placement.world_rank} was {future.status} "
                    "by someone else than the trainer"
                )
        alive = self._client.nthreads()
        for spec, future in zip(self._specs, self._futures):
            placement = spec.placement
            if future.status != "finished" and placement.worker not in alive:
                return WorkerLostError(
                    f"the worker {placement.worker} on node {placement.node_id}, which "
                    f"ran rank {placement.world_rank}, left the cluster"
                )
        return None

    def cancel(self) -> None:
        """Drop the tasks. Running ranks go on until they stop at their next report
        (:meth:`dckpt.train._channel.ReportChannel.stop`)."""
        self._client.cancel(self._futures)
