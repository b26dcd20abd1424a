"""``Predictor``: a model loaded from a checkpoint that scores batches.

As in Ray AIR (2.6), a predictor is made from a checkpoint
(:meth:`Predictor.from_checkpoint`), applies the checkpoint's preprocessor to each batch
and returns predictions in the kind of container it was given. Batches are numpy arrays,
dicts of numpy arrays, or pandas DataFrames; numpy and pandas are imported only when a
batch of theirs is seen, so this module itself needs neither.

Ready-made predictors for models that need no framework:

- :class:`SklearnLikePredictor`: a picklable object with a ``predict(X)`` method;
- :class:`FunctionPredictor`: a picklable model and a function ``fn(model, batch)``.

Both read the model from the checkpoint's dict key ``"model"`` (a dict checkpoint), or
from a ``model.pkl`` file (a directory checkpoint, written with cloudpickle), as
:func:`model_checkpoint` writes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import cloudpickle

from dckpt._checkpoint import Checkpoint
from dckpt.errors import CheckpointFormatError

__all__ = ["FunctionPredictor", "Predictor", "SklearnLikePredictor", "model_checkpoint"]

P = TypeVar("P", bound="Predictor")

MODEL_KEY = "model"
MODEL_FILE = "model.pkl"
#: The column (DataFrame) or key (dict) that holds predictions of an array model.
PREDICTIONS = "predictions"


class Predictor:
    """Scores batches with a model loaded from a checkpoint (Ray AIR's ``Predictor``).

    Subclasses implement :meth:`from_checkpoint` and :meth:`_predict`. :meth:`predict`
    applies the preprocessor first: its ``transform_batch(batch)`` if it has one (the
    Ray Data preprocessor API), else the preprocessor itself if it is callable.

    Output: whatever :meth:`_predict` returns, except that a one- or two-dimensional
    array answer to a DataFrame becomes a DataFrame with the batch's index (one column
    ``"predictions"``, or ``"predictions_0"``, ``"predictions_1"``... for several), and
    an array answer to a dict of arrays becomes ``{"predictions": array}`` — as Ray does.

    Parameters
    ----------
    preprocessor
        Applied to every batch before the model; ``None`` for none.
    """

    def __init__(self, preprocessor: Any = None) -> None:
        self._preprocessor = preprocessor

    @classmethod
    def from_checkpoint(cls: type[P], checkpoint: Checkpoint, **kwargs: Any) -> P:  # noqa: PYI019 - no typing.Self on 3.10
        """Create a predictor from ``checkpoint`` (its model and its preprocessor)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_checkpoint")

    def get_preprocessor(self) -> Any:
        """The preprocessor applied to every batch, or ``None``."""
        return self._preprocessor

    def set_preprocessor(self, preprocessor: Any) -> None:
        """Apply ``preprocessor`` to every batch from now on (``None``: none)."""
        self._preprocessor = preprocessor

    def predict(self, batch: Any, **kwargs: Any) -> Any:
        """Predictions for ``batch``: a numpy array, a dict of them, or a DataFrame.

        Raises
        ------
        TypeError
            ``batch`` is none of those.
        """
        _check_batch(batch)
        data = self._preprocess(batch)
        return _shape_like(batch, self._predict(data, **kwargs))

    def _predict(self, batch: Any, **kwargs: Any) -> Any:
        """The model's answer to one preprocessed batch; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _predict")

    def _preprocess(self, batch: Any) -> Any:
        preprocessor = self._preprocessor
        if preprocessor is None:
            return batch
        transform = getattr(preprocessor, "transform_batch", None)
        if callable(transform):
            return transform(batch)
        if callable(preprocessor):
            return preprocessor(batch)
        raise TypeError(
            f"the preprocessor {type(preprocessor).__name__} has no transform_batch() "
            "and is not callable"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(preprocessor={self._preprocessor!r})"


class SklearnLikePredictor(Predictor):
    """A model with a ``predict(X)`` method (scikit-learn style), scoring whole batches.

    ``X`` is the preprocessed batch as it is: an array, or a DataFrame (restricted to
    ``feature_columns`` when given to :meth:`predict`).
    """

    def __init__(self, model: Any, preprocessor: Any = None) -> None:
        super().__init__(preprocessor)
        if not callable(getattr(model, "predict", None)):
            raise TypeError(f"{type(model).__name__} has no predict() method")
        self.model = model

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, **kwargs: Any
    ) -> SklearnLikePredictor:
        """The model stored by :func:`model_checkpoint`, and the checkpoint's preprocessor."""
        return cls(load_model(checkpoint), preprocessor=checkpoint.get_preprocessor(), **kwargs)

    def _predict(self, batch: Any, feature_columns: list[str] | None = None, **kwargs: Any) -> Any:
        if feature_columns is not None:
            batch = batch[feature_columns]
        return self.model.predict(batch, **kwargs)


class FunctionPredictor(Predictor):
    """A picklable model scored by a function ``fn(model, batch, **kwargs)``.

    Without ``fn`` the model itself is called: ``model(batch, **kwargs)``.
    """

    def __init__(
        self,
        model: Any,
        fn: Callable[..., Any] | None = None,
        preprocessor: Any = None,
    ) -> None:
        super().__init__(preprocessor)
        if fn is None and not callable(model):
            raise TypeError(f"{type(model).__name__} is not callable and no fn was given")
        self.model = model
        self.fn = fn

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        fn: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> FunctionPredictor:
        """The model stored by :func:`model_checkpoint`, scored with ``fn``."""
        return cls(load_model(checkpoint), fn, preprocessor=checkpoint.get_preprocessor(),
                   **kwargs)

    def _predict(self, batch: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            return self.model(batch, **kwargs)
        return self.fn(self.model, batch, **kwargs)


def model_checkpoint(model: Any, preprocessor: Any = None) -> Checkpoint:
    """A dict checkpoint holding ``model`` (and a preprocessor), as the predictors read it."""
    checkpoint = Checkpoint.from_dict({MODEL_KEY: model})
    if preprocessor is not None:
        checkpoint.set_preprocessor(preprocessor)
    return checkpoint


def load_model(checkpoint: Checkpoint) -> Any:
    """The model of a checkpoint: dict key ``"model"``, else a ``model.pkl`` file.

    Raises
    ------
    CheckpointFormatError
        The checkpoint holds neither.
    """
    kind, _ = checkpoint.get_internal_representation()
    if kind == "data_dict":
        data = checkpoint.to_dict()
        if MODEL_KEY in data:
            return data[MODEL_KEY]
    with checkpoint.as_directory() as directory:
        path = os.path.join(directory, MODEL_FILE)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return cloudpickle.load(f)
        # A directory written from a dict checkpoint keeps the dict in a pickle file.
        data = Checkpoint.from_directory(directory).to_dict()
    if MODEL_KEY in data:
        return data[MODEL_KEY]
    raise CheckpointFormatError(
        f"{checkpoint!r} holds no model: expected a dict key {MODEL_KEY!r} or a file "
        f"{MODEL_FILE!r} (see dckpt.predict.model_checkpoint)"
    )


# --- batches -----------------------------------------------------------------------


def _kind(batch: Any) -> str | None:
    """``"pandas"``, ``"numpy"``, ``"dict"`` or None, without importing either library."""
    module = type(batch).__module__.split(".")[0]
    if module == "pandas" and type(batch).__name__ == "DataFrame":
        return "pandas"
    if module == "numpy" and type(batch).__name__ == "ndarray":
        return "numpy"
    if isinstance(batch, Mapping):
        return "dict"
    return None


def _check_batch(batch: Any) -> None:
    if _kind(batch) is None:
        raise TypeError(
            f"a batch is a numpy array, a dict of arrays or a pandas DataFrame, "
            f"not {type(batch).__name__}"
        )


def _shape_like(batch: Any, predictions: Any) -> Any:
    """``predictions`` in the container kind of ``batch`` when it is a bare array."""
    kind = _kind(batch)
    if _kind(predictions) != "numpy" or kind == "numpy":
        return predictions
    if kind == "dict":
        return {PREDICTIONS: predictions}
    import pandas as pd

    if predictions.ndim == 1:
        return pd.DataFrame({PREDICTIONS: predictions}, index=batch.index)
    if predictions.ndim == 2:
        columns = [f"{PREDICTIONS}_{i}" for i in range(predictions.shape[1])]
        return pd.DataFrame(predictions, columns=columns, index=batch.index)
    raise ValueError(f"cannot put {predictions.ndim}-dimensional predictions in a DataFrame")
