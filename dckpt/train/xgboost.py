"""XGBoost checkpoints and predictors (Ray AIR's ``ray.train.xgboost``).

:class:`XGBoostCheckpoint` holds a booster in XGBoost's own model format, not a
pickle: the JSON file ``model.json`` (Ray 2.7+'s name), which any XGBoost since 1.0
loads with ``Booster.load_model``. Checkpoints Ray wrote are read too: Ray 2.6's file
``model`` (JSON, UBJSON or the old binary format, as its XGBoost wrote it) and a
``model.ubj``. :class:`XGBoostPredictor` scores numpy and pandas batches with it.

XGBoost itself is imported only when a model is saved, loaded or scored: this module
imports without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dckpt._checkpoint import Checkpoint
from dckpt.predict import Predictor
from dckpt.train import _framework

if TYPE_CHECKING:
    import xgboost

__all__ = ["XGBoostCheckpoint", "XGBoostPredictor"]

#: Where the model is, in the order looked for: dckpt's and Ray 2.7+'s name, UBJSON,
#: Ray 2.6's (``ray.air.constants.MODEL_KEY``, no extension).
_MODEL_FILES = ("model.json", "model.ubj", "model")


class XGBoostCheckpoint(Checkpoint):
    """A :class:`~dckpt.Checkpoint` holding an XGBoost booster as ``model.json``.

    Make one with :meth:`from_model`, or from any checkpoint with
    :meth:`~dckpt.Checkpoint.from_checkpoint`; read the booster with :meth:`get_model`.
    """

    #: The model's file in the checkpoint's directory (Ray 2.7+'s name).
    MODEL_FILENAME = _MODEL_FILES[0]

    @classmethod
    def from_model(
        cls, booster: xgboost.Booster | Any, *, preprocessor: Any = None
    ) -> XGBoostCheckpoint:
        """A dict checkpoint holding ``booster`` saved as ``model.json``.

        Parameters
        ----------
        booster
            An ``xgboost.Booster``, or a fitted scikit-learn-style model of XGBoost
            (``XGBClassifier``, ...), whose booster is saved (Ray takes only the first).
        preprocessor
            Applied by :class:`XGBoostPredictor` to every batch before the model.
        """
        booster = booster.get_booster() if hasattr(booster, "get_booster") else booster
        return _framework.checkpoint_from_file(
            cls, booster.save_model, cls.MODEL_FILENAME, preprocessor)

    def get_model(self) -> xgboost.Booster:
        """The booster stored in this checkpoint.

        Raises
        ------
        CheckpointFormatError
            The checkpoint holds none of ``model.json``, ``model.ubj`` and ``model``.
        """
        import xgboost

        with self.as_directory() as directory:
            with open(_framework.model_path(self, directory, _MODEL_FILES), "rb") as f:
                raw = bytearray(f.read())
        booster = xgboost.Booster()
        # From memory, XGBoost tells JSON from UBJSON by the content, whatever the name
        # (from a path it guesses by the extension, which Ray 2.6's "model" lacks).
        booster.load_model(raw)
        return booster


class XGBoostPredictor(Predictor):
    """Scores batches with an XGBoost booster (Ray AIR's ``XGBoostPredictor``).

    Parameters
    ----------
    model
        The ``xgboost.Booster``.
    preprocessor
        Applied to every batch first (see :class:`~dckpt.predict.Predictor`).
    """

    def __init__(self, model: xgboost.Booster, preprocessor: Any = None) -> None:
        super().__init__(preprocessor)
        self.model = model

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, **kwargs: Any) -> XGBoostPredictor:
        """The booster and preprocessor of ``checkpoint`` (any checkpoint holding one of
        the model files: it is read through :class:`XGBoostCheckpoint`)."""
        checkpoint = XGBoostCheckpoint.from_checkpoint(checkpoint)
        return cls(checkpoint.get_model(), preprocessor=checkpoint.get_preprocessor(), **kwargs)

    def _predict(
        self,
        batch: Any,
        feature_columns: Sequence[Any] | None = None,
        dmatrix_kwargs: Mapping[str, Any] | None = None,
        **predict_kwargs: Any,
    ) -> Any:
        """``model.predict`` on a ``DMatrix`` of the batch's ``feature_columns``.

        ``dmatrix_kwargs`` go to ``xgboost.DMatrix`` and ``predict_kwargs`` to
        ``Booster.predict``, as in Ray.
        """
        import xgboost

        matrix = xgboost.DMatrix(_framework.to_frame(batch, feature_columns), **dict(dmatrix_kwargs or {}))
        return self.model.predict(matrix, **predict_kwargs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model!r}, "
                f"preprocessor={self.get_preprocessor()!r})")
