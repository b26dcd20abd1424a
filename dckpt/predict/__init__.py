"""Predictors made from checkpoints: one process, a Dask batch job, an HTTP deployment.

:class:`Predictor` is the base class (Ray AIR's API); :class:`SklearnLikePredictor` and
:class:`FunctionPredictor` serve plain picklable models; :func:`model_checkpoint` makes
a checkpoint they read.
"""

from __future__ import annotations

from dckpt.predict._predictor import (
    FunctionPredictor,
    Predictor,
    SklearnLikePredictor,
    load_model,
    model_checkpoint,
)

__all__ = [
    "FunctionPredictor",
    "Predictor",
    "SklearnLikePredictor",
    "load_model",
    "model_checkpoint",
]
