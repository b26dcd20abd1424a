"""scikit-learn checkpoints and predictors (Ray AIR's ``ray.train.sklearn``).

:class:`SklearnCheckpoint` holds a fitted estimator as Ray saves one: a pickle of it in
the file ``model.pkl`` (Ray 2.7+'s name; checkpoints Ray 2.6 wrote, whose file is
named ``model``, are read too). :class:`SklearnPredictor` scores numpy and pandas
batches with it, in one process, in :class:`~dckpt.predict.BatchPredictor` or in
:class:`~dckpt.predict.PredictorDeployment`.

scikit-learn itself is imported only when a model is fitted or scored: this module
imports without it, so a checkpoint can be read and copied where it is not installed.

.. warning::
   The estimator is a pickle: load only checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Sequence
from typing import Any

import cloudpickle

from dckpt._checkpoint import Checkpoint
from dckpt.predict import Predictor
from dckpt.train import _framework

__all__ = ["SklearnCheckpoint", "SklearnPredictor"]

#: Where the estimator is, in the order looked for: dckpt's and Ray 2.7+'s name, Ray 2.6's.
_MODEL_FILES = ("model.pkl", "model")


class SklearnCheckpoint(Checkpoint):
    """A :class:`~dckpt.Checkpoint` holding a scikit-learn estimator.

    Make one with :meth:`from_estimator`, or from any checkpoint with
    :meth:`~dckpt.Checkpoint.from_checkpoint`; read the estimator with
    :meth:`get_estimator`.
    """

    #: The estimator's file in the checkpoint's directory (Ray 2.7+'s name).
    MODEL_FILENAME = _MODEL_FILES[0]

    @classmethod
    def from_estimator(cls, estimator: Any, *, preprocessor: Any = None) -> SklearnCheckpoint:
        """A dict checkpoint holding ``estimator`` (pickled with cloudpickle) as ``model.pkl``.

        Parameters
        ----------
        estimator
            Any picklable estimator, fitted or not (scikit-learn is not needed to
            pickle it).
        preprocessor
            Applied by :class:`SklearnPredictor` to every batch before the estimator.
        """

        def write(path: str) -> None:
            with open(path, "wb") as f:
                cloudpickle.dump(estimator, f, protocol=pickle.HIGHEST_PROTOCOL)

        return _framework.checkpoint_from_file(cls, write, cls.MODEL_FILENAME, preprocessor)

    def get_estimator(self) -> Any:
        """The estimator stored in this checkpoint (unpickled: trust its source).

        Raises
        ------
        CheckpointFormatError
            The checkpoint holds no ``model.pkl`` (nor Ray 2.6's ``model``).
        """
        with self.as_directory() as directory:
            with open(_framework.model_path(self, directory, _MODEL_FILES), "rb") as f:
                return pickle.load(f)


class SklearnPredictor(Predictor):
    """Scores batches with a scikit-learn estimator (Ray AIR's ``SklearnPredictor``).

    Parameters
    ----------
    estimator
        The fitted estimator; its ``predict`` is called on each batch.
    preprocessor
        Applied to every batch first (see :class:`~dckpt.predict.Predictor`).
    """

    def __init__(self, estimator: Any, preprocessor: Any = None) -> None:
        super().__init__(preprocessor)
        self.estimator = estimator

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, **kwargs: Any) -> SklearnPredictor:
        """The estimator and preprocessor of ``checkpoint`` (any checkpoint holding a
        ``model.pkl``: it is read through :class:`SklearnCheckpoint`)."""
        checkpoint = SklearnCheckpoint.from_checkpoint(checkpoint)
        return cls(checkpoint.get_estimator(), preprocessor=checkpoint.get_preprocessor(),
                   **kwargs)

    def _predict(
        self,
        batch: Any,
        feature_columns: Sequence[Any] | None = None,
        num_estimator_jobs: int | None = None,
        **predict_kwargs: Any,
    ) -> Any:
        """``estimator.predict`` on the batch's ``feature_columns`` (all when ``None``).

        ``num_estimator_jobs`` sets the estimator's ``n_jobs`` for this call where it
        has one, as in Ray (``None``: leave it as it is).
        """
        features = _framework.to_frame(batch, feature_columns)
        with _n_jobs(self.estimator, num_estimator_jobs):
            return self.estimator.predict(features, **predict_kwargs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(estimator={self.estimator!r}, "
                f"preprocessor={self.get_preprocessor()!r})")


@contextlib.contextmanager
def _n_jobs(estimator: Any, n_jobs: int | None) -> Any:
    """``estimator``'s ``n_jobs`` parameters set to ``n_jobs`` within the block."""
    if n_jobs is None or not hasattr(estimator, "get_params"):
        yield
        return
    old = {k: v for k, v in estimator.get_params().items() if k.endswith("n_jobs")}
    estimator.set_params(**dict.fromkeys(old, n_jobs))
    try:
        yield
    finally:
        estimator.set_params(**old)
