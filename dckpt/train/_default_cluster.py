"""The trainer's own local cluster, for a ``fit()`` with no Dask client.

Driver side. Ray's ``Trainer.fit()`` starts a local Ray runtime when there is none;
:meth:`DataParallelTrainer.fit` likewise starts a :class:`distributed.LocalCluster`
(worker processes, one per rank) for the run when there is no client, and closes it
when the run ends, however it ends.

Checkpoints that ranks report are node references into those workers, which are gone
once ``fit()`` returns. So before the cluster closes, :func:`without_cluster` makes
every checkpoint of the :class:`Result` one that needs no cluster: a directory
checkpoint on this machine's disk, the persisted copy at the run's local
``storage_uri`` where there is one (the default storage is this machine's disk), else a
copy of its own written with :meth:`Checkpoint.to_directory` (under
``dckpt.temporary-directory``; the caller owns it, as any ``to_directory()`` result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

import distributed

from dckpt import _storage
from dckpt._checkpoint import Checkpoint, node_ref_of
from dckpt.train._result import Result

logger = logging.getLogger(__name__)

__all__ = ["local_cluster", "without_cluster"]

# Two threads per worker: a rank of a failed attempt that still waits for its dead
# peer does not hold up the new attempt's rank on the same worker (as in dckpt demo).
_THREADS_PER_WORKER = 2


@contextlib.contextmanager
def local_cluster(n_workers: int, run_name: str) -> Iterator[distributed.Client]:
    """A client of a fresh local cluster of ``n_workers`` worker processes.

    Its dashboard takes a free port (``":0"``), so that it never clashes with another
    cluster's 8787. The client is the default one within the block, as a user's own
    would be (a checkpoint manager made without a client, a large checkpoint pickled
    on the driver, find it); cluster and client are closed on leaving the block, so
    no default client is left behind.
    """
    logger.info("Training run %r: no Dask client, so starting a local cluster of %d "
                "worker processes for it, closed when fit() returns (pass client=, or "
                "create a distributed.Client first, to train on a cluster of your own)",
                run_name, n_workers)
    with distributed.LocalCluster(
        n_workers=n_workers, threads_per_worker=_THREADS_PER_WORKER, processes=True,
        dashboard_address=":0",
    ) as cluster:
        try:
            with distributed.Client(cluster, set_as_default=True) as client:
                logger.info("Training run %r: local cluster at %s", run_name,
                            cluster.scheduler_address)
                yield client
        finally:
            logger.info("Training run %r: closing its local cluster", run_name)


def without_cluster(result: Result, client: distributed.Client) -> Result:
    """``result`` with each checkpoint that is a node reference made local.

    Runs while the cluster is still up (a reference may have to be fetched from its
    node). A checkpoint listed twice (the latest among the best) stays one object.
    """
    local: dict[int, Checkpoint] = {}

    def made_local(checkpoint: Checkpoint) -> Checkpoint:
        if id(checkpoint) not in local:
            local[id(checkpoint)] = _on_this_machine(checkpoint, client)
        return local[id(checkpoint)]

    return dataclasses.replace(
        result,
        checkpoint=made_local(result.checkpoint) if result.checkpoint is not None else None,
        best_checkpoints=[(made_local(c), m) for c, m in result.best_checkpoints],
    )


def _on_this_machine(checkpoint: Checkpoint, client: distributed.Client) -> Checkpoint:
    ref = node_ref_of(checkpoint)
    if ref is None:  # a dict, a URI or a directory of this process: needs no cluster
        return checkpoint
    for uri in reversed(ref.uris):  # the manager's persisted copy is the last one
        if _storage.is_local_uri(uri) and os.path.isdir(_storage.local_path_of(uri)):
            return type(checkpoint).from_uri(uri)
    with client.as_current():
        path = checkpoint.to_directory()
    return type(checkpoint).from_directory(path)
