"""``BatchPredictor``: score a Dask collection with a predictor loaded once per worker.

Ray AIR's ``BatchPredictor`` (2.6) scores a Ray Dataset with an autoscaling pool of
actors. Here the pool is one :class:`~dckpt.predict._batch_scorer.PredictorScorer`
actor on each scoring worker, placed first where the checkpoint already is, and the
scoring tasks are restricted to those workers (:mod:`dckpt.predict._restrictions`),
where they call the local actor: the model loads at most once per worker, the
checkpoint comes to each node at most once, and a partition is scored where it is
computed.

This module is the client side: it checks the request, chooses the workers
(:func:`choose_scoring_workers`, pure), creates the actors and builds the lazy
collection. The worker side is :mod:`dckpt.predict._batch_scorer`; what it does to
each batch, :mod:`dckpt.predict._batch_format`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import dask.config
from distributed import Client, Future, get_client

from dckpt._checkpoint import Checkpoint
from dckpt.cluster import install, worker_nodes
from dckpt.errors import BatchFormatError, ScoringWorkersError
from dckpt.predict import _batch_scorer
from dckpt.predict._batch_format import ScoreOptions
from dckpt.predict._holder_nodes import holder_nodes
from dckpt.predict._predictor import _check_batch, _kind
from dckpt.predict._restrictions import SCORER_PREFIX, ScoringRestrictionsPlugin

__all__ = ["BatchPredictor", "choose_scoring_workers"]

B = TypeVar("B", bound="BatchPredictor")

logger = logging.getLogger(__name__)


class BatchPredictor:
    """Scores Dask collections with ``predictor_cls`` made from ``checkpoint``.

    Parameters
    ----------
    checkpoint
        The model's checkpoint. One that lives on a worker (returned by a task) stays
        there and travels as a reference; a directory of this process is first staged
        in one node's store (:func:`dckpt.put`); a dict, bytes or URI checkpoint travels
        with each scorer as it would with any task.
    predictor_cls
        A :class:`~dckpt.predict.Predictor` subclass (any class with
        ``from_checkpoint`` whose instances have ``predict`` will do).
    **predictor_kwargs
        Passed to ``predictor_cls.from_checkpoint``.

    Notes
    -----
    The scorers (one Dask actor per scoring worker, holding the loaded predictor) are
    kept between calls of :meth:`predict` and live as long as this object, or the
    collections it returned, or :meth:`close`. A scorer serves one batch at a time,
    as a Ray actor does; workers with several threads still read and prepare other
    partitions meanwhile.

    Examples
    --------
    >>> predictor = BatchPredictor(checkpoint, SklearnLikePredictor)  # doctest: +SKIP
    >>> scores = predictor.predict(ddf, feature_columns=["x"], keep_columns=["id"])  # doctest: +SKIP
    >>> scores.compute()  # doctest: +SKIP
    """

    _checkpoint: Checkpoint
    _predictor_cls: type
    _predictor_kwargs: dict[str, Any]
    _preprocessor: Any
    _token: str
    _client: Client | None
    _scorers: dict[str, Future]

    def __init__(self, checkpoint: Checkpoint, predictor_cls: type, **predictor_kwargs: Any) -> None:
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"checkpoint must be a dckpt.Checkpoint, not {type(checkpoint).__name__}")
        _check_predictor_cls(predictor_cls)
        self._checkpoint = checkpoint
        self._predictor_cls = predictor_cls
        self._predictor_kwargs = dict(predictor_kwargs)
        self._preprocessor = _batch_scorer.KEEP
        self._token = uuid.uuid4().hex[:16]
        self._client = None
        self._scorers = {}

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, predictor_cls: type, **kwargs: Any
    ) -> BatchPredictor:
        """The same as ``BatchPredictor(checkpoint, predictor_cls, **kwargs)`` (Ray's API)."""
        return cls(checkpoint, predictor_cls, **kwargs)

    def get_preprocessor(self) -> Any:
        """The preprocessor the predictors apply: one set here, else the checkpoint's."""
        if isinstance(self._preprocessor, str) and self._preprocessor == _batch_scorer.KEEP:
            return self._checkpoint.get_preprocessor()
        return self._preprocessor

    def set_preprocessor(self, preprocessor: Any) -> None:
        """Use ``preprocessor`` instead of the checkpoint's from the next :meth:`predict`.

        The scorers loaded so far are closed: the next call loads new ones.
        """
        self._preprocessor = preprocessor
        self.close()

    @property
    def scoring_workers(self) -> list[str]:
        """The workers that hold a scorer of this predictor now."""
        return sorted(self._scorers)

    def predict(
        self,
        data: Any,
        *,
        feature_columns: Sequence[str] | None = None,
        keep_columns: Sequence[str] | None = None,
        batch_size: int | None = None,
        min_scoring_workers: int = 1,
        max_scoring_workers: int | None = None,
        client: Client | None = None,
        meta: Any = None,
        **predict_kwargs: Any,
    ) -> Any:
        """Predictions for ``data``, as a lazy collection of the same kind.

        Parameters
        ----------
        data
            - a dask DataFrame: gives a DataFrame of the predictions (one column
              ``"predictions"``, or the predictor's columns) plus ``keep_columns``,
              with the partitions and index of ``data``;
            - a dask Array (rows along axis 0): gives an Array of predictions, chunked
              like ``data`` along axis 0 (the other axes become one chunk);
            - a dask Bag of records (dicts): gives a Bag of records, one per input
              record, with the prediction columns and ``keep_columns``; each partition
              is scored as one DataFrame;
            - a list of batches (numpy arrays, dicts of arrays, pandas DataFrames, or
              futures of them): gives a list of futures, one per batch, already
              running, as ``client.map`` would (gather them with ``client.gather``).
        feature_columns
            The columns the predictor sees (all when ``None``), as in Ray.
        keep_columns
            Columns of ``data`` added to the predictions, row for row, as in Ray.
        batch_size
            At most this many rows per call of the predictor; ``None``: a partition
            (block, batch) is one call.
        min_scoring_workers, max_scoring_workers
            How many workers score: at least ``min`` (waiting up to
            ``dckpt.predict.batch.worker-wait-timeout`` for them), at most ``max``
            (default: every worker), never more than there are partitions (blocks,
            batches) unless ``min`` asks for it. Workers whose node holds the
            checkpoint (its owner, then nodes with a cached copy, from the scheduler's
            registry) are chosen first.
        client
            The client of the cluster; the default one when ``None``.
        meta
            DataFrame and Array only: an empty object shaped like the output. When
            ``None`` it is learnt by scoring a made-up two-row sample on one scoring
            worker, which loads the model there now rather than at compute time.
        **predict_kwargs
            Passed to the predictor's ``predict()`` for every batch.

        Raises
        ------
        TypeError
            ``data`` is none of those kinds.
        BatchFormatError
            Unknown ``feature_columns`` or ``keep_columns``, columns asked of an array,
            or predictions that do not fit the output (e.g. a dict for an Array).
        ScoringWorkersError
            Fewer than ``min_scoring_workers`` workers.

        A scoring worker that dies while the result is computed fails that
        computation with Dask's ``RuntimeError("Worker holding Actor was lost")``:
        Dask does not rebuild an actor that a client holds. The next ``predict()``
        drops that scorer and scores on the workers alive.
        """
        kind = _collection_kind(data)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        options = ScoreOptions(
            feature_columns=None if feature_columns is None else tuple(feature_columns),
            keep_columns=None if keep_columns is None else tuple(keep_columns),
            batch_size=batch_size,
            predict_kwargs=dict(predict_kwargs),
        )
        _check_columns(kind, data, options)
        client = self._bind(client or get_client())
        units = _units(kind, data)
        scorers = self._scorers_for(client, min_scoring_workers, max_scoring_workers, units)
        if kind == "dataframe":
            return self._predict_frame(client, data, options, scorers, meta)
        if kind == "array":
            return self._predict_array(client, data, options, scorers, meta)
        if kind == "bag":
            return data.map_partitions(_batch_scorer.score_records, options, *scorers)
        return [
            client.submit(_batch_scorer.score, batch, options, *scorers, pure=False,
                          key=f"dckpt-predict-{self._token}-{uuid.uuid4().hex[:8]}-{i}")
            for i, batch in enumerate(data)
        ]

    def close(self) -> None:
        """Release the scorers: each worker drops its predictor once no collection
        returned by :meth:`predict` still needs it."""
        for future in self._scorers.values():
            future.release()
        self._scorers = {}

    def __enter__(self: B) -> B:  # noqa: PYI019 - no typing.Self on 3.10
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BatchPredictor({self._checkpoint!r}, {self._predictor_cls.__name__}, "
                f"{len(self._scorers)} scorers)")

    # ------------------------------------------------------------------ scorers

    def _bind(self, client: Client) -> Client:
        if self._client is not client:
            self.close()  # scorers of another cluster (or client) are of no use here
            self._client = client
        install(client)
        client.register_plugin(ScoringRestrictionsPlugin())
        return client

    def _scorers_for(
        self, client: Client, min_workers: int, max_workers: int | None, units: int
    ) -> list[Future]:
        """Scorers on the chosen workers: the ones kept from earlier calls, and new ones."""
        workers = _workers(client, min_workers)
        checkpoint = self._travelling_checkpoint(client, workers)
        holders = holder_nodes(client, checkpoint, workers)
        limit = max(min_workers, min(units, max_workers or len(workers)))
        chosen = choose_scoring_workers(workers, holders, min_workers=min_workers,
                                        max_workers=limit)
        for address in [a for a, f in self._scorers.items() if a not in workers or f.status == "error"]:
            self._scorers.pop(address).release()  # its worker left, or it failed to load
        for address in chosen:
            if address not in self._scorers:
                self._scorers[address] = client.submit(
                    _batch_scorer.PredictorScorer, checkpoint, self._predictor_cls,
                    self._predictor_kwargs, self._preprocessor,
                    key=f"{SCORER_PREFIX}{self._token}-{uuid.uuid4().hex[:8]}",
                    workers=[address],
                    # A worker that left between the choice and the start does not
                    # leave the actor waiting for it. (One that dies later fails the
                    # run: Dask does not rebuild an actor a client holds.)
                    allow_other_workers=True,
                    actor=True,
                )
        logger.info("scoring on %d workers (checkpoint held on nodes %s): %s",
                    len(chosen), holders, chosen)
        return [self._scorers[address] for address in chosen]

    def _travelling_checkpoint(self, client: Client, workers: dict[str, str]) -> Checkpoint:
        """The checkpoint as the scorers receive it; a local directory is staged once."""
        kind, _ = self._checkpoint.get_internal_representation()
        if kind == "local_path":
            from dckpt import put

            # One push to one node, then each node fetches it once through the stores,
            # instead of the whole directory inside every scorer's arguments.
            self._checkpoint = put(self._checkpoint, [min(workers.values())], client=client)
        return self._checkpoint

    # ------------------------------------------------------------------ outputs

    def _predict_frame(
        self, client: Client, data: Any, options: ScoreOptions, scorers: list[Future], meta: Any
    ) -> Any:
        if meta is None:
            meta = _probe(client, data._meta_nonempty.iloc[:2], options, scorers)
            if _kind(meta) != "pandas":
                raise BatchFormatError(
                    f"predictions of a DataFrame must be a DataFrame, not {type(meta).__name__}"
                )
            meta = meta.iloc[:0]
        return data.map_partitions(_batch_scorer.score, options, *scorers, meta=meta)

    def _predict_array(
        self, client: Client, data: Any, options: ScoreOptions, scorers: list[Future], meta: Any
    ) -> Any:
        import numpy as np

        if data.ndim == 0 or any(np.isnan(d) for d in data.shape[1:]):
            raise BatchFormatError(
                f"an Array to score needs rows along axis 0 and known other dimensions, "
                f"not shape {data.shape}"
            )
        data = data.rechunk({axis: -1 for axis in range(1, data.ndim)})
        if meta is None:
            sample = np.ones((2, *data.shape[1:]), dtype=data.dtype)
            meta = _probe(client, sample, options, scorers)
            if _kind(meta) != "numpy" or meta.ndim == 0:
                raise BatchFormatError(
                    f"predictions of an Array must be an array with rows, not "
                    f"{type(meta).__name__}; score a list of batches instead"
                )
        trailing = tuple(meta.shape[1:])
        out_ndim = 1 + len(trailing)
        return data.map_blocks(
            _batch_scorer.score, options, *scorers,
            chunks=(data.chunks[0], *((d,) for d in trailing)),
            drop_axis=list(range(out_ndim, data.ndim)) or None,
            new_axis=list(range(data.ndim, out_ndim)) or None,
            dtype=meta.dtype,
            meta=np.empty((0,) * out_ndim, dtype=meta.dtype),
        )


# ----------------------------------------------------------------------- helpers


def _check_predictor_cls(predictor_cls: Any) -> None:
    if not isinstance(predictor_cls, type) or not callable(getattr(predictor_cls, "from_checkpoint", None)):
        raise TypeError(
            f"predictor_cls must be a Predictor class (with from_checkpoint), not "
            f"{predictor_cls!r}; e.g. dckpt.predict.SklearnLikePredictor"
        )
    if not callable(getattr(predictor_cls, "predict", None)):
        raise TypeError(f"predictor_cls {predictor_cls.__name__} has no predict() method")


def choose_scoring_workers(
    workers: Mapping[str, str],
    holders: Sequence[str],
    *,
    min_workers: int = 1,
    max_workers: int | None = None,
) -> list[str]:
    """The scoring workers, in order of preference.

    Parameters
    ----------
    workers
        ``{worker address: node id}`` of the workers alive.
    holders
        Node ids that hold the checkpoint already, best first (the owner, then nodes
        with a cached copy). Their workers come first: they score without moving a
        byte of the checkpoint.
    min_workers, max_workers
        How many workers to use at least and at most (``None``: all of them).

    Returns
    -------
    list of str
        Workers of holder nodes (in the order of ``holders``), then the other workers
        grouped by node, so that every further node adds all its workers for the one
        transfer it costs. Deterministic for the same input.

    Raises
    ------
    ScoringWorkersError
        Fewer than ``min_workers`` workers.
    ValueError
        ``min_workers`` below 1, or ``max_workers`` below ``min_workers``.
    """
    if min_workers < 1:
        raise ValueError(f"min_scoring_workers must be at least 1, not {min_workers}")
    if max_workers is not None and max_workers < min_workers:
        raise ValueError(
            f"max_scoring_workers ({max_workers}) is below min_scoring_workers ({min_workers})"
        )
    if len(workers) < min_workers:
        raise ScoringWorkersError(
            f"{min_workers} scoring workers are needed and the cluster has {len(workers)}; "
            "add workers or lower min_scoring_workers"
        )
    rank = {node_id: i for i, node_id in reversed(list(enumerate(holders)))}
    order = sorted(
        workers, key=lambda address: (rank.get(workers[address], len(rank)), workers[address], address)
    )
    return order if max_workers is None else order[:max_workers]


def _collection_kind(data: Any) -> str:
    """``"dataframe"``, ``"array"``, ``"bag"`` or ``"list"``, by type, without importing."""
    module = type(data).__module__.split(".")
    if module[0] == "dask" and len(module) > 1:
        if module[1] == "dataframe" and type(data).__name__ == "DataFrame":
            return "dataframe"
        if module[1] == "array" and type(data).__name__ == "Array":
            return "array"
        if module[1] == "bag" and type(data).__name__ == "Bag":
            return "bag"
    if isinstance(data, (list, tuple)):
        for batch in data:
            if not isinstance(batch, Future):
                _check_batch(batch)
        return "list"
    raise TypeError(
        "BatchPredictor.predict takes a dask DataFrame, Array or Bag, or a list of "
        f"batches, not {type(data).__module__}.{type(data).__name__}"
    )


def _check_columns(kind: str, data: Any, options: ScoreOptions) -> None:
    """Unknown columns are known before anything runs, for a DataFrame or an Array."""
    asked = {"feature_columns": options.feature_columns, "keep_columns": options.keep_columns}
    for what, columns in asked.items():
        if columns is None:
            continue
        if kind == "array":
            raise BatchFormatError(f"{what} {list(columns)} given for an Array, which has no columns")
        if kind == "dataframe":
            missing = [c for c in columns if c not in data.columns]
            if missing:
                raise BatchFormatError(
                    f"{what}: no column {missing} in the DataFrame; it has {list(data.columns)}"
                )


def _units(kind: str, data: Any) -> int:
    """How many partitions, blocks or batches: more scorers than that would idle."""
    if kind == "array":
        return len(data.chunks[0]) if data.ndim else 1
    if kind == "list":
        return len(data)
    return int(data.npartitions)


def _workers(client: Client, min_workers: int) -> dict[str, str]:
    """``{address: node id}`` of the workers, once there are ``min_workers`` of them."""
    setting = "dckpt.predict.batch.worker-wait-timeout"
    try:
        return worker_nodes(client, max(min_workers, 1), timeout=dask.config.get(setting),
                            setting=setting)
    except TimeoutError as e:
        raise ScoringWorkersError(
            f"{min_workers} scoring workers are needed and {e}; add workers or lower "
            "min_scoring_workers"
        ) from e


def _probe(client: Client, sample: Any, options: ScoreOptions, scorers: list[Future]) -> Any:
    """The predictions of ``sample`` on a scoring worker (loads the model there now)."""
    status, value = client.submit(_batch_scorer.probe, sample, options, *scorers, pure=False).result()
    if isinstance(value, BatchFormatError):
        raise value  # the request itself is wrong (e.g. keep_columns over a prediction)
    if status == "error":
        raise BatchFormatError(
            f"the predictor failed on a made-up sample of the data ({value!r}), which "
            "is how the output's shape is learnt; pass meta= (an empty object shaped "
            "like the output) instead"
        ) from value
    return value
