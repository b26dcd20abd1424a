"""One replica of a :class:`~dckpt.predict.PredictorDeployment`: a Dask actor on a worker.

Worker side. The actor is created by a task on the worker (its ``__init__`` runs in a
task thread, where the checkpoint is materialized and the model loaded); its
:meth:`PredictorReplica.predict` runs in the worker's actor thread, one call at a time.

The predictor's own exceptions come back as a value, :class:`PredictorFailure`, not as
a raised error: the driver can then tell "the predictor refused this batch" (give the
caller the error) from "the replica could not be reached" (try another replica).
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass
from typing import Any

import cloudpickle

__all__ = ["PredictorFailure", "PredictorReplica", "RemoteTraceback"]


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a worker, as text (the ``__cause__`` of
    the exception re-raised on the driver, as ``concurrent.futures`` does)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class PredictorFailure:
    """An exception the predictor raised on a replica, with its traceback as text."""

    error: BaseException
    traceback: str

    @classmethod
    def of(cls, error: Exception) -> PredictorFailure:
        """Wrap ``error``; one that cannot be pickled becomes a ``RuntimeError``
        carrying its type and message, so that the answer always reaches the driver."""
        text = "".join(traceback.format_exception(error))
        try:
            pickle.loads(cloudpickle.dumps(error))
        except Exception:  # noqa: BLE001 - any failure to travel means "send a stand-in"
            error = RuntimeError(f"{type(error).__qualname__}: {error}")
        return cls(error, text)

    def reraise(self) -> None:
        """Raise the predictor's exception here, chained to its remote traceback."""
        raise self.error from RemoteTraceback(f"\n\nOn the replica:\n{self.traceback}")


class PredictorReplica:
    """A predictor made from a checkpoint on this worker, answering batches.

    Parameters
    ----------
    payload
        ``cloudpickle.dumps((checkpoint, predictor_cls, predictor_kwargs))``, made once
        on the driver so that every replica gets the same checkpoint reference (a node
        reference is then materialized at most once per node, by the node's store).
    """

    _predictor: Any

    def __init__(self, payload: bytes) -> None:
        checkpoint, predictor_cls, kwargs = cloudpickle.loads(payload)
        self._predictor = predictor_cls.from_checkpoint(checkpoint, **kwargs)

    def predict(self, batch: Any, kwargs: dict[str, Any]) -> Any:
        """The predictor's answer to ``batch``, or a :class:`PredictorFailure`."""
        try:
            return self._predictor.predict(batch, **kwargs)
        except Exception as e:  # noqa: BLE001 - the caller gets it, re-raised there
            return PredictorFailure.of(e)
