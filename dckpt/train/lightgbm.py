"""LightGBM checkpoints and predictors (Ray AIR's ``ray.train.lightgbm``).

:class:`LightGBMCheckpoint` holds a booster in LightGBM's own text format, not a
pickle: the file ``model.txt`` (Ray 2.7+'s name), which LightGBM's command line and
every binding load. Checkpoints Ray 2.6 wrote, whose file is named ``model``, are read
too. :class:`LightGBMPredictor` scores numpy and pandas batches with it.

LightGBM itself is imported only when a model is loaded or scored: this module imports
without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dckpt._checkpoint import Checkpoint
from dckpt.predict import Predictor
from dckpt.train import _framework

if TYPE_CHECKING:
    import lightgbm

__all__ = ["LightGBMCheckpoint", "LightGBMPredictor"]

#: Where the model is, in the order looked for: dckpt's and Ray 2.7+'s name, then
#: Ray 2.6's (``ray.air.constants.MODEL_KEY``, no extension).
_MODEL_FILES = ("model.txt", "model")


class LightGBMCheckpoint(Checkpoint):
    """A :class:`~dckpt.Checkpoint` holding a LightGBM booster as ``model.txt``.

    Make one with :meth:`from_model`, or from any checkpoint with
    :meth:`~dckpt.Checkpoint.from_checkpoint`; read the booster with :meth:`get_model`.
    """

    #: The model's file in the checkpoint's directory (Ray 2.7+'s name).
    MODEL_FILENAME = _MODEL_FILES[0]

    @classmethod
    def from_model(
        cls, booster: lightgbm.Booster | Any, *, preprocessor: Any = None
    ) -> LightGBMCheckpoint:
        """A dict checkpoint holding ``booster`` saved as ``model.txt``.

        Parameters
        ----------
        booster
            A ``lightgbm.Booster``, or a fitted scikit-learn-style model of LightGBM
            (``LGBMClassifier``, ...), whose booster is saved (Ray takes only the first).
        preprocessor
            Applied by :class:`LightGBMPredictor` to every batch before the model.
        """
        booster = getattr(booster, "booster_", booster)
        return _framework.checkpoint_from_file(
            cls, booster.save_model, cls.MODEL_FILENAME, preprocessor)

    def get_model(self) -> lightgbm.Booster:
        """The booster stored in this checkpoint.

        Raises
        ------
        CheckpointFormatError
            The checkpoint holds neither ``model.txt`` nor ``model``.
        """
        import lightgbm

        with self.as_directory() as directory:
            return lightgbm.Booster(model_file=_framework.model_path(self, directory, _MODEL_FILES))


class LightGBMPredictor(Predictor):
    """Scores batches with a LightGBM booster (Ray AIR's ``LightGBMPredictor``).

    Parameters
    ----------
    model
        The ``lightgbm.Booster``.
    preprocessor
        Applied to every batch first (see :class:`~dckpt.predict.Predictor`).
    """

    def __init__(self, model: lightgbm.Booster, preprocessor: Any = None) -> None:
        super().__init__(preprocessor)
        self.model = model

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, **kwargs: Any) -> LightGBMPredictor:
        """The booster and preprocessor of ``checkpoint`` (any checkpoint holding one of
        the model files: it is read through :class:`LightGBMCheckpoint`)."""
        checkpoint = LightGBMCheckpoint.from_checkpoint(checkpoint)
        return cls(checkpoint.get_model(), preprocessor=checkpoint.get_preprocessor(), **kwargs)

    def _predict(
        self, batch: Any, feature_columns: Sequence[Any] | None = None, **predict_kwargs: Any
    ) -> Any:
        """``model.predict`` on the batch's ``feature_columns`` (all when ``None``);
        ``predict_kwargs`` go to ``Booster.predict``, as in Ray."""
        return self.model.predict(_framework.to_frame(batch, feature_columns), **predict_kwargs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model!r}, "
                f"preprocessor={self.get_preprocessor()!r})")
