"""The worker side of batch prediction: one loaded predictor per worker, and the tasks
that use it.

:class:`PredictorScorer` is a Dask actor: :class:`~dckpt.predict.BatchPredictor`
creates one on each scoring worker, and its constructor loads the predictor there from
the checkpoint. The checkpoint arrives as a node reference; loading it resolves the
reference through this node's store, so the bytes come to each node at most once
(:meth:`dckpt.cluster._store.NodeStore.open`).

The scoring tasks (:func:`score`, :func:`score_records`, :func:`probe`) take every
scorer of the prediction as dependencies, which is what lets the scheduler plugin
(:mod:`dckpt.predict._restrictions`) restrict them to the scoring workers, and call the
scorer of the worker they run on directly: the batch never leaves that worker. They run
in task threads; the scorer's lock makes one call at a time use the predictor, as a
Ray actor would.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from distributed import get_worker
from distributed.actor import Actor

from dckpt import _compat, _node
from dckpt._checkpoint import Checkpoint
from dckpt.errors import ScoringWorkersError
from dckpt.predict._batch_format import (
    ScoreOptions,
    concat,
    frame_to_records,
    keep_columns,
    records_to_frame,
    select_columns,
    split,
)

__all__ = ["PredictorScorer", "probe", "score", "score_records"]

logger = logging.getLogger(__name__)

#: ``preprocessor`` of :class:`PredictorScorer` when the checkpoint's is used.
KEEP = "keep-the-checkpoints-preprocessor"


class PredictorScorer:
    """A predictor loaded on this worker from a checkpoint (a Dask actor).

    Parameters
    ----------
    checkpoint
        The checkpoint, loaded with ``predictor_cls.from_checkpoint``.
    predictor_cls, predictor_kwargs
        As given to :class:`~dckpt.predict.BatchPredictor`.
    preprocessor
        One to use instead of the checkpoint's (``None``: none), or :data:`KEEP`.
    """

    predictor: Any
    info: dict[str, Any]
    _lock: threading.Lock

    def __init__(
        self,
        checkpoint: Checkpoint,
        predictor_cls: Any,
        predictor_kwargs: Mapping[str, Any],
        preprocessor: Any = KEEP,
    ) -> None:
        start = time.perf_counter()
        self.predictor = predictor_cls.from_checkpoint(checkpoint, **predictor_kwargs)
        if not (isinstance(preprocessor, str) and preprocessor == KEEP):
            self.predictor.set_preprocessor(preprocessor)
        self._lock = threading.Lock()
        self.info = {
            "worker": get_worker().address,
            "node_id": _node.node_id(),
            "pid": os.getpid(),
            "load_seconds": time.perf_counter() - start,
        }
        logger.info("loaded %s on %s in %.2f s", predictor_cls.__name__,
                    self.info["worker"], self.info["load_seconds"])

    def describe(self) -> dict[str, Any]:
        """Where this scorer runs and how long its predictor took to load."""
        return dict(self.info)

    def score(self, batch: Any, options: ScoreOptions) -> Any:
        """Predictions for ``batch``, cut into ``options.batch_size`` rows at most."""
        parts = []
        for piece in split(batch, options.batch_size):
            features = select_columns(piece, options.feature_columns)
            with self._lock:
                predictions = self.predictor.predict(features, **options.predict_kwargs)
            parts.append(keep_columns(piece, predictions, options.keep_columns))
        return concat(parts)


def score(batch: Any, options: ScoreOptions, *scorers: Actor) -> Any:
    """Task: a partition, block or batch scored by this worker's scorer."""
    return _local_scorer(scorers).score(batch, options)


def score_records(records: Iterable[Any], options: ScoreOptions, *scorers: Actor) -> list[Any]:
    """Task: a bag partition of records scored as one DataFrame; records again."""
    frame = records_to_frame(records)
    if frame.empty:
        return []
    return frame_to_records(_local_scorer(scorers).score(frame, options))


def probe(sample: Any, options: ScoreOptions, *scorers: Actor) -> tuple[str, Any]:
    """Task: the predictions of a made-up sample, to learn their shape and types.

    ``("ok", predictions)``, or ``("error", exception)`` when the predictor failed on
    the sample (the caller tells that apart from a failure to load).
    """
    scorer = _local_scorer(scorers)
    try:
        return "ok", scorer.score(sample, options)
    except Exception as e:  # noqa: BLE001 - reported to the caller, which explains
        return "error", e


def _local_scorer(scorers: Iterable[Actor]) -> PredictorScorer:
    """The scorer on this worker, itself (not a proxy): no batch travels to it."""
    worker = get_worker()
    keys = []
    for proxy in scorers:
        keys.append(proxy.key)
        scorer = _compat.actor_instance(worker, proxy.key)
        if isinstance(scorer, PredictorScorer):
            return scorer
    raise ScoringWorkersError(
        f"worker {worker.address} has no predictor of this batch prediction "
        f"(scorers {keys}); is the dckpt-scoring scheduler plugin installed?"
    )
