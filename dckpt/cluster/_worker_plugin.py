"""The worker plugin that gives every Dask worker its :class:`NodeStore`.

Registered once per cluster, it runs on every worker that is there and on every worker
that joins or restarts later, so each has a store from its start.
"""

from __future__ import annotations

import logging

from distributed import Client, Worker
from distributed.diagnostics.plugin import WorkerPlugin

from dckpt.cluster._store import STORE_KEY, NodeStore

logger = logging.getLogger(__name__)

PLUGIN_NAME = "dckpt"


class NodeStorePlugin(WorkerPlugin):
    """Creates the worker's store as an actor under :data:`STORE_KEY`.

    The store sits in ``worker.state.actors`` (so that actor proxies reach it), not in
    ``worker.extensions``: distributed 2026.8's scheduler looks up
    ``scheduler.extensions[name]`` for every worker extension in its heartbeat handler
    without a guard.
    """

    name = PLUGIN_NAME
    idempotent = True

    def setup(self, worker: Worker) -> None:
        if STORE_KEY not in worker.state.actors:
            worker.state.actors[STORE_KEY] = NodeStore(worker.address)
            logger.info("dckpt store ready on %s", worker.address)

    def teardown(self, worker: Worker) -> None:
        worker.state.actors.pop(STORE_KEY, None)


def install(client: Client) -> None:
    """Give every worker of ``client``'s cluster, present and future, a store."""
    client.register_plugin(NodeStorePlugin(), name=PLUGIN_NAME)
