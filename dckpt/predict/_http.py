"""The HTTP JSON endpoint of a deployment, with tornado (a Dask dependency).

Driver side. The server runs in a thread of its own with its own event loop, not on
the Dask client's loop: a slow or blocked request handler can then never delay the
client's heartbeats, and the server works the same whatever loop the client uses.
The event-loop thread only parses HTTP; each request's work (reading its JSON,
waiting for a replica, writing the answer) runs in a pool of
``dckpt.predict.deployment.http-threads`` threads, so requests are handled
concurrently and the loop never blocks.

Routes (every answer, errors included, is a JSON object):

- ``POST /predict``: body and answer as in :mod:`dckpt.predict._json`. 400 with
  ``{"error": ...}`` for a body that is not JSON, a body in no known form, or a batch
  the predictor raised an exception for (the message names the exception); 503 when
  no replica could answer (none ready in time, or the deployment is closing); 500 for
  a failure of the server itself, e.g. predictions JSON cannot carry.
- ``GET /healthz``: ``{"status": "ok" | "degraded" | "unavailable", "replicas": [...]}``
  (see :meth:`PredictorDeployment.health`); 200 while at least one replica is ready,
  503 otherwise, as load balancers expect.
- anything else: 404 (unknown path) or 405 (wrong method), with a JSON error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

import dask.config
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler

from dckpt.errors import ReplicaUnavailableError
from dckpt.predict._json import BadRequestError, dump, dump_predictions, load_request
from dckpt.predict._replica_actor import PredictorFailure

logger = logging.getLogger(__name__)

__all__ = ["PredictionServer"]

# How long close() waits for open connections to finish before it drops them.
_CLOSE_TIMEOUT = 5.0


def answer(predict: Callable[[Any], Any], body: bytes) -> tuple[int, bytes]:
    """The status and body that answer a ``POST /predict`` with ``body``.

    ``predict(batch)`` returns the predictions or a :class:`PredictorFailure`. Runs in
    the server's thread pool.
    """
    try:
        batch = load_request(body)
        predictions = predict(batch)
    except BadRequestError as e:
        return 400, dump({"error": str(e)})
    except ReplicaUnavailableError as e:
        return 503, dump({"error": str(e)})
    except Exception as e:
        logger.exception("POST /predict failed")
        return 500, dump({"error": f"{type(e).__name__}: {e}"})
    if isinstance(predictions, PredictorFailure):
        error = predictions.error
        return 400, dump({"error": f"the predictor raised {type(error).__name__}: {error}"})
    try:
        return 200, dump_predictions(predictions)
    except (TypeError, ValueError) as e:
        logger.exception("The predictions could not be written as JSON")
        return 500, dump({"error": f"the predictions cannot be written as JSON: {e}"})


def health_answer(health: Callable[[], dict[str, Any]]) -> tuple[int, bytes]:
    """The status and body that answer ``GET /healthz``."""
    state = health()
    return (503 if state["status"] == "unavailable" else 200), dump(state)


class _JSONHandler(RequestHandler):
    """Errors (404, 405, 500 from tornado itself) as JSON too."""

    def initialize(self, server: PredictionServer) -> None:
        self.server = server

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self._send(status_code, dump({"error": self._reason}))

    def _send(self, status: int, body: bytes) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(body)

    async def _in_pool(self, func: Callable[..., tuple[int, bytes]], *args: Any) -> None:
        loop = asyncio.get_running_loop()
        status, body = await loop.run_in_executor(self.server.pool, func, *args)
        self._send(status, body)


class _PredictHandler(_JSONHandler):
    async def post(self) -> None:
        await self._in_pool(answer, self.server.predict, self.request.body)


class _HealthHandler(_JSONHandler):
    async def get(self) -> None:
        await self._in_pool(health_answer, self.server.health)


class _NotFoundHandler(_JSONHandler):
    def prepare(self) -> None:
        raise HTTPError(404)


class PredictionServer:
    """An HTTP server answering ``/predict`` and ``/healthz``, started at once.

    Parameters
    ----------
    predict
        ``predict(batch)``: the predictions, or a :class:`PredictorFailure`.
    health
        ``health()``: the document ``GET /healthz`` answers.
    host, port
        Where to listen; port 0 picks a free port (see :attr:`port`).

    Raises
    ------
    OSError
        The address cannot be bound (in use, unknown host).
    """

    predict: Callable[[Any], Any]
    health: Callable[[], dict[str, Any]]
    pool: concurrent.futures.ThreadPoolExecutor
    host: str
    port: int
    _loop: asyncio.AbstractEventLoop
    _server: HTTPServer
    _thread: threading.Thread
    _closed: bool

    def __init__(self, predict: Callable[[Any], Any], health: Callable[[], dict[str, Any]],
                 host: str, port: int) -> None:
        self.predict, self.health, self.host = predict, health, host
        # Bound here, in the caller's thread, so that a bad address raises here.
        sockets = bind_sockets(port, address=host)
        self.port = int(sockets[0].getsockname()[1])
        threads = int(dask.config.get("dckpt.predict.deployment.http-threads"))
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, "dckpt-serve-request")
        self._loop = asyncio.new_event_loop()
        self._closed = False
        started = concurrent.futures.Future[None]()
        self._thread = threading.Thread(target=self._run, args=(sockets, started),
                                        name=f"dckpt-serve-{self.port}", daemon=True)
        self._thread.start()
        started.result()

    def _run(self, sockets: list[Any], started: concurrent.futures.Future[None]) -> None:
        """The server thread: the event loop, until :meth:`close` stops it."""
        asyncio.set_event_loop(self._loop)

        async def listen() -> None:  # tornado wants a running loop for this
            routes = [(r"/predict", _PredictHandler, {"server": self}),
                      (r"/healthz", _HealthHandler, {"server": self})]
            app = Application(routes, default_handler_class=_NotFoundHandler,
                              default_handler_args={"server": self})
            self._server = HTTPServer(app)
            self._server.add_sockets(sockets)

        try:
            self._loop.run_until_complete(listen())
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
            started.set_exception(e)
            self._loop.close()
            return
        started.set_result(None)
        try:
            self._loop.run_forever()
            # Requests still waiting for their thread: nobody will read their answer.
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        finally:
            self._loop.close()

    def stop_listening(self) -> None:
        """Close the listening sockets (new connections are refused); requests in
        flight go on."""
        if not self._closed:
            asyncio.run_coroutine_threadsafe(self._stop_listening(), self._loop).result()

    async def _stop_listening(self) -> None:
        self._server.stop()

    async def _shut(self) -> None:
        self._server.stop()
        try:
            await asyncio.wait_for(self._server.close_all_connections(), _CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning("Connections to %s:%d still open after %.0f s; dropped",
                           self.host, self.port, _CLOSE_TIMEOUT)
        self._loop.stop()

    def close(self) -> None:
        """Stop listening, end the open connections, stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop)
        self._thread.join()
        self.pool.shutdown(wait=False, cancel_futures=True)
