"""``PredictorDeployment``: a predictor served by replicas on the cluster, over HTTP too.

The counterpart of Ray Serve's ``PredictorDeployment`` (Ray 2.6) on Dask. Driver side:
this module is the façade; the replicas live in :mod:`dckpt.predict._replica_set` (driver)
and :mod:`dckpt.predict._replica_actor` (worker), the HTTP server in
:mod:`dckpt.predict._http`.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import cloudpickle
import distributed

from dckpt._checkpoint import Checkpoint
from dckpt.predict._holder_nodes import holder_nodes
from dckpt.predict._http import PredictionServer
from dckpt.predict._predictor import Predictor
from dckpt.predict._replica_actor import PredictorFailure
from dckpt.predict._replica_set import ReplicaSet

logger = logging.getLogger(__name__)

__all__ = ["PredictorDeployment"]


class PredictorDeployment:
    """Replicas of a predictor on the cluster's workers, answering batches and HTTP.

    Each replica is a Dask actor on a worker of its own (spread across nodes) holding
    ``predictor_cls.from_checkpoint(checkpoint, **predictor_kwargs)``, made on that
    worker: the checkpoint is materialized there when the predictor reads it, once per
    node, by the node's store. Among nodes with as few replicas, those that hold the
    checkpoint already (its owner, then cached copies, from the scheduler's registry)
    come first. The constructor returns once every replica is ready.

    Requests (:meth:`predict`, or ``POST /predict`` after :meth:`serve`) go to the
    replica with the fewest requests in flight, as counted by this process. A replica
    runs one request at a time (a worker has one actor thread); more wait on it.

    When a replica's worker dies, the replica is retired and another one started on a
    free live worker (one without a replica), its checkpoint materialized there in
    turn; until then the deployment runs with fewer replicas, and if no worker is free
    the slot waits for one to join. The death is noticed when a call to the replica
    fails, or by a check of the scheduler's workers every
    ``dckpt.predict.deployment.check-interval``; the requests it had in flight are
    sent to another replica, so callers still get their answer (each request tries at
    most ``dckpt.predict.deployment.max-attempts`` replicas).

    Parameters
    ----------
    checkpoint
        Any checkpoint ``predictor_cls`` reads; pickled once, here, so that every
        replica gets the same reference.
    predictor_cls
        A :class:`~dckpt.predict.Predictor` subclass (anything with a
        ``from_checkpoint`` classmethod whose result has ``predict(batch)``).
    num_replicas
        How many replicas; at most the number of workers alive.
    client
        The Dask client (synchronous); default: the current default client.
    **predictor_kwargs
        Passed to ``predictor_cls.from_checkpoint`` on each replica.

    Raises
    ------
    ValueError
        ``num_replicas`` is below 1 or above the number of workers alive.
    Exception
        Whatever ``from_checkpoint`` raised on a worker, with its remote traceback.

    Examples
    --------
    >>> checkpoint = model_checkpoint(fitted_model)  # doctest: +SKIP
    >>> with PredictorDeployment(checkpoint, SklearnLikePredictor, num_replicas=2) as d:
    ...     d.predict(np.array([[1.0, 2.0]]))
    ...     host, port = d.serve(port=8000)  # POST /predict {"instances": [[1.0, 2.0]]}
    """

    _client: distributed.Client
    _replicas: ReplicaSet
    _server: PredictionServer | None
    _closed: bool

    def __init__(
        self,
        checkpoint: Checkpoint,
        predictor_cls: type[Predictor],
        *,
        num_replicas: int = 1,
        client: distributed.Client | None = None,
        **predictor_kwargs: Any,
    ) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        if not callable(getattr(predictor_cls, "from_checkpoint", None)):
            raise TypeError(f"{predictor_cls!r} has no from_checkpoint(); pass a Predictor "
                            "subclass such as SklearnLikePredictor")
        self._client = client if client is not None else distributed.default_client()
        self._server = None
        self._closed = True  # until the replicas are up: close() has nothing to stop
        payload = cloudpickle.dumps((checkpoint, predictor_cls, predictor_kwargs))
        client = self._client
        self._replicas = ReplicaSet(
            client, payload, num_replicas,
            holders=lambda workers: holder_nodes(client, checkpoint, workers),
        )
        self._closed = False
        logger.info("%r ready", self)

    def predict(self, batch: Any, **predict_kwargs: Any) -> Any:
        """Predictions for ``batch`` from the least busy replica.

        Parameters
        ----------
        batch
            A numpy array, a dict of arrays or a pandas DataFrame.
        **predict_kwargs
            Passed to the predictor's ``predict``.

        Raises
        ------
        ReplicaUnavailableError
            No replica could answer (see the class's notes), or the deployment is
            closed.
        Exception
            What the predictor raised for this batch, with the replica's traceback as
            its ``__cause__``.
        """
        outcome = self._outcome(batch, **predict_kwargs)
        if isinstance(outcome, PredictorFailure):
            outcome.reraise()
        return outcome

    def _outcome(self, batch: Any, **predict_kwargs: Any) -> Any:
        """The replica's answer: predictions, or the predictor's failure as a value."""
        return self._replicas.run("predict", batch, predict_kwargs)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Answer HTTP on ``host:port`` from now until :meth:`close`.

        ``POST /predict`` with ``{"instances": [[...], ...]}`` (rows: a numpy array),
        ``{"columns": {"name": [...], ...}}`` (a dict of arrays) or
        ``{"dataframe": {"name": [...], ...}}`` (a pandas DataFrame) answers
        ``{"predictions": [...]}``; ``GET /healthz`` answers :meth:`health`. Errors
        answer ``{"error": "..."}``: 400 for a body that is not JSON or in no such
        form, or a batch the predictor raised for; 503 when no replica could answer;
        500 for a failure of the server itself. The server runs in a thread of its
        own, with its own event loop; requests are handled concurrently, by
        ``dckpt.predict.deployment.http-threads`` threads.

        Parameters
        ----------
        host
            The address to listen on; ``"0.0.0.0"`` for every interface.
        port
            The port; 0 picks a free one.

        Returns
        -------
        (host, port)
            Where the endpoint listens: ``http://{host}:{port}/predict``.

        Raises
        ------
        RuntimeError
            The deployment is closed, or already serving.
        OSError
            The address cannot be bound.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._server is not None:
            raise RuntimeError(f"{self!r} already serves HTTP at {self.address}")
        self._server = PredictionServer(self._outcome, self.health, host, port)
        logger.info("Serving %r at http://%s:%d", self, host, self._server.port)
        return host, self._server.port

    @property
    def address(self) -> tuple[str, int] | None:
        """Where :meth:`serve` listens, or None when it does not."""
        server = self._server
        return None if server is None else (server.host, server.port)

    def health(self) -> dict[str, Any]:
        """The state of each replica.

        Returns
        -------
        dict
            ``status``: ``"ok"`` (every replica ready), ``"degraded"`` (some) or
            ``"unavailable"`` (none, or closed); ``num_replicas``; ``replicas``: one
            dict per slot with its ``state`` (``"ready"``, ``"starting"``,
            ``"empty"``, ``"closed"``) and, as known, its ``worker`` address,
            ``node`` id, requests ``in_flight`` and ``served``, or the ``error`` that
            left it empty.
        """
        replicas = self._replicas.states()
        ready = sum(r["state"] == "ready" for r in replicas)
        status = ("ok" if ready == len(replicas) else "degraded" if ready else "unavailable")
        return {"status": status, "num_replicas": len(replicas), "replicas": replicas}

    def close(self) -> None:
        """Stop the HTTP server and the replicas. Safe to call more than once.

        The port stops listening first; then the replicas stop, and requests still in
        flight get :class:`ReplicaUnavailableError` (HTTP 503).
        """
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.stop_listening()
        self._replicas.close()
        if server is not None:
            server.close()
        logger.info("%r closed", self)

    def __enter__(self) -> PredictorDeployment:  # noqa: PYI034 - no typing.Self on 3.10
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        replicas = getattr(self, "_replicas", None)
        count = "?" if replicas is None else len(replicas.states())
        state = ", closed" if self._closed else ""
        return f"PredictorDeployment(num_replicas={count}{state})"
