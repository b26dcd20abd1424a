"""The exceptions dckpt raises.

Each type is chosen by what the caller should do about it, and each also subclasses
the built-in exception a caller already catches (``FileNotFoundError``,
``ValueError``), so code written for Ray AIR or plain Python keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CheckpointFormatError",
    "UnsafePathError",
    "UnsupportedRayClassError",
    "CorruptChunkError",
    "CheckpointURIError",
    "StorageError",
    "IncompatibleCheckpointError",
    "CacheFullError",
    "CheckpointUnavailableError",
    "IsolationUnavailableError",
    # dckpt.train
    "TrainingFailedError",
    "WorkerLostError",
    "NoBestCheckpointError",
    "MetricNotFoundError",
    # dckpt.predict
    "ScoringWorkersError",
    "BatchFormatError",
    "ReplicaUnavailableError",
]


class CheckpointError(Exception):
    """Base class of every error dckpt raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A directory or URI that should hold a checkpoint holds nothing."""


class IncompleteCheckpointError(CheckpointNotFoundError):
    """A URI holds a dckpt upload that never finished (no commit marker).

    A subclass of ``FileNotFoundError``: there is no *complete* checkpoint there, and a
    caller looking for the latest usable checkpoint should move on to an older one.
    """


class CheckpointFormatError(CheckpointError, ValueError):
    """Bytes or files that are not a dckpt checkpoint, or are damaged.

    Raised before anything is unpickled: headers, lengths and checksums are checked
    first.
    """


class UnsafePathError(CheckpointFormatError):
    """An archive or manifest entry would land outside the target directory."""


class UnsupportedRayClassError(CheckpointFormatError):
    """A checkpoint Ray AIR wrote names a class that dckpt does not map.

    Ray's metadata (``.metadata.pkl``) names the checkpoint's class; dckpt reads the
    classes it has a counterpart of (``ray.air.checkpoint.Checkpoint`` and the
    framework checkpoints) and refuses any other before unpickling anything else. Map
    more with ``dckpt.ray.classes`` (``{"ray.module:RayClass": "pkg.module:DckptClass"}``).
    Also raised for a class of Ray in the checkpoint's own data when Ray is not
    installed.
    """


class CorruptChunkError(CheckpointFormatError):
    """A chunk of a directory transfer failed its length or checksum check.

    The receiver fetches such a chunk again (``dckpt.transfer.retries`` times) before
    it gives up with this error; the message names the file and offset.
    """


class CheckpointURIError(CheckpointError, ValueError):
    """A URI whose protocol fsspec does not know, or whose backend is not installed."""


class StorageError(CheckpointError, OSError):
    """The storage back-end at a URI failed: no credentials, no connection, no such
    bucket to write into, access denied, a local disk error, ...

    Raised by :mod:`dckpt._storage` in place of whatever the fsspec back-end raised
    (``botocore``'s ``NoCredentialsError``, ``EndpointConnectionError``, ...), which
    is kept as ``__cause__`` (look there for an ``errno``). The message names the operation and the URI. An ``OSError``, so code
    that catches I/O failures catches it. What means "no checkpoint there" on a read
    is :class:`CheckpointNotFoundError` instead, for a missing bucket as for a missing
    ``memory://`` path.
    """


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """Data saved by one ``Checkpoint`` subclass loaded through an unrelated one."""


class CacheFullError(CheckpointError, OSError):
    """The node cache has no room for a checkpoint, even after evicting what it may.

    What is left is pinned by checkpoints in use, or the checkpoint alone is larger
    than the budget: raise ``dckpt.cache.max-bytes`` (``DASK_DCKPT__CACHE__MAX_BYTES``
    on the workers). An ``OSError``, like the disk-full error it stands in for.
    """


class CheckpointUnavailableError(CheckpointNotFoundError):
    """No step of a node reference's resolution could provide its data.

    The owning node is gone (or unreachable), the path is not shared, this node's cache
    does not hold it, and no URI the reference carries answered. The message lists each
    step tried and why it failed.
    """


class IsolationUnavailableError(CheckpointError, RuntimeError):
    """A :class:`~dckpt.cluster.NodeCluster` was asked for an isolation this machine
    refuses: mount namespaces (``isolate=True``), or network namespaces and ``tc``
    (``network=True``, ``link_rate=``): not Linux, not root, no ``ip``/``tc``, or a
    container without ``CAP_NET_ADMIN``. The message says which and why; pass ``None``
    instead of ``True`` to fall back with a warning.
    """


# -- dckpt.train ------------------------------------------------------------------


class TrainingFailedError(CheckpointError, RuntimeError):
    """Training failed more often than ``max_failures`` allows, or could not start.

    Raised by :meth:`dckpt.train.DataParallelTrainer.fit`, as Ray's ``Trainer.fit`` raises its
    ``TrainingFailedError``; chained (``__cause__``) from the last failure.

    Attributes
    ----------
    result : dckpt.train.Result
        What the run got to: its metrics history, latest and best checkpoints, with
        ``result.error`` set. Resume a new run with
        ``resume_from_checkpoint=err.result.checkpoint``.
    """

    # Any, not Result: this module is below every layer (Result is dckpt.train's).
    result: Any

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[type, tuple[str, Any]]:
        return type(self), (str(self), self.result)


class WorkerLostError(CheckpointError, RuntimeError):
    """The worker that ran a rank left the cluster (it died or was retired)."""


class NoBestCheckpointError(CheckpointError, RuntimeError):
    """:meth:`dckpt.train.Result.get_best_checkpoint` has nothing to choose from.

    The run kept no checkpoint, or none of the kept ones reported the metric asked
    for. A ``RuntimeError``, which is what Ray AIR's ``Result.get_best_checkpoint``
    raises in both cases.
    """


class MetricNotFoundError(CheckpointError, KeyError):
    """The metrics reported with a checkpoint lack ``checkpoint_score_attribute``
    (:class:`dckpt.train.CheckpointConfig`).

    A ``KeyError`` (the metric is a missing key); its message names the attribute and
    the keys that were there. Nothing is registered when it is raised.
    """

    def __str__(self) -> str:
        # KeyError's own __str__ shows the repr of its argument, quotes and all.
        return str(self.args[0]) if self.args else ""


# -- dckpt.predict ----------------------------------------------------------------


class ScoringWorkersError(CheckpointError, RuntimeError):
    """:class:`~dckpt.predict.BatchPredictor` has too few workers to score on, or a
    scoring task found no predictor where it ran.

    Raised when the cluster has fewer than ``min_scoring_workers`` workers after
    ``dckpt.predict.batch.worker-wait-timeout``: add workers, or lower
    ``min_scoring_workers``.
    """


class BatchFormatError(CheckpointError, ValueError):
    """Data that cannot be scored as asked: unknown columns, a column name that would
    be overwritten by a prediction, columns asked of an array, or predictions whose
    kind cannot be fitted into the collection they should return in."""


class ReplicaUnavailableError(CheckpointError, RuntimeError):
    """No replica of a :class:`~dckpt.predict.PredictorDeployment` could answer: none
    became ready within ``dckpt.predict.deployment.start-timeout``, each one tried was
    lost (``dckpt.predict.deployment.max-attempts``), or the deployment is closed."""
