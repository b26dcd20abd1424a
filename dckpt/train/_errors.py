"""The errors of ``dckpt.train``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dckpt.errors import CheckpointError

if TYPE_CHECKING:
    from dckpt.train._result import Result

__all__ = ["NoBestCheckpointError", "TrainingFailedError", "WorkerLostError"]


class TrainingFailedError(CheckpointError, RuntimeError):
    """Training failed more often than ``max_failures`` allows, or could not start.

    Raised by :meth:`DataParallelTrainer.fit`, as Ray's ``Trainer.fit`` raises its
    ``TrainingFailedError``; chained (``__cause__``) from the last failure.

    Attributes
    ----------
    result : Result
        What the run got to: its metrics history, latest and best checkpoints, with
        ``result.error`` set. Resume a new run with
        ``resume_from_checkpoint=err.result.checkpoint``.
    """

    result: Result

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[type, tuple[str, Result]]:
        return type(self), (str(self), self.result)


class WorkerLostError(CheckpointError, RuntimeError):
    """The worker that ran a rank left the cluster (it died or was retired)."""


class NoBestCheckpointError(CheckpointError, RuntimeError):
    """:meth:`Result.get_best_checkpoint` has nothing to choose from.

    The run kept no checkpoint, or none of the kept ones reported the metric asked
    for. A ``RuntimeError``, which is what Ray AIR's ``Result.get_best_checkpoint``
    raises in both cases.
    """
