"""Predictors made from checkpoints: one process, a Dask batch job, an HTTP deployment.

:class:`Predictor` is the base class (Ray AIR's API); :class:`SklearnLikePredictor` and
:class:`FunctionPredictor` serve plain picklable models; :func:`model_checkpoint` makes
a checkpoint they read. :class:`BatchPredictor` scores Dask collections with one
predictor per worker, placed where the checkpoint already is.
:class:`PredictorDeployment` runs replicas of a predictor as Dask actors and serves
them over HTTP (Ray Serve's ``PredictorDeployment``).
"""

from __future__ import annotations

from dckpt.errors import BatchFormatError, ReplicaUnavailableError, ScoringWorkersError
from dckpt.predict._batch_predictor import BatchPredictor
from dckpt.predict._deployment import PredictorDeployment
from dckpt.predict._predictor import (
    FunctionPredictor,
    Predictor,
    SklearnLikePredictor,
    load_model,
    model_checkpoint,
)

__all__ = [
    "BatchFormatError",
    "BatchPredictor",
    "FunctionPredictor",
    "Predictor",
    "PredictorDeployment",
    "ReplicaUnavailableError",
    "ScoringWorkersError",
    "SklearnLikePredictor",
    "load_model",
    "model_checkpoint",
]
