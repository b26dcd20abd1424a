"""The errors of :class:`~dckpt.predict.BatchPredictor`."""

from __future__ import annotations

from dckpt.errors import CheckpointError

__all__ = ["BatchFormatError", "ScoringWorkersError"]


class ScoringWorkersError(CheckpointError, RuntimeError):
    """Too few workers to score on, or a scoring task found no predictor where it ran.

    Raised when the cluster has fewer than ``min_scoring_workers`` workers after
    ``dckpt.predict.batch.worker-wait-timeout``: add workers, or lower
    ``min_scoring_workers``.
    """


class BatchFormatError(CheckpointError, ValueError):
    """Data that cannot be scored as asked: unknown columns, a column name that would
    be overwritten by a prediction, columns asked of an array, or predictions whose
    kind cannot be fitted into the collection they should return in."""
