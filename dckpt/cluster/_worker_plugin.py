"""The worker plugin that gives every Dask worker its :class:`NodeStore`.

Registered once per cluster, it runs on every worker that is there and on every worker
that joins or restarts later, so each has a store from its start. It also reports what
the store holds to the scheduler's registry (:mod:`dckpt.cluster._scheduler_plugin`).

Normally the scheduler side installs this plugin (:func:`dckpt.cluster.install`, or the
scheduler preload); adding it on its own (the worker preload) gives workers their
stores without a registry.

Everything here runs on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed import Client, Worker
from distributed.diagnostics.plugin import WorkerPlugin

from dckpt import _compat, _transfer
from dckpt.cluster import _metrics
from dckpt.cluster._store import STORE_KEY, NodeStore

logger = logging.getLogger(__name__)

#: The name of both halves: the scheduler plugin and the worker plugin.
PLUGIN_NAME = "dckpt"


class NodeStorePlugin(WorkerPlugin):
    """Creates the worker's store as an actor under :data:`STORE_KEY` and reports
    its holdings to the scheduler.

    The store sits in ``worker.state.actors`` (so that actor proxies reach it), not in
    ``worker.extensions``: distributed 2026.8's scheduler looks up
    ``scheduler.extensions[name]`` for every worker extension in its heartbeat handler
    without a guard.

    Reporting: every ``dckpt.registry.interval`` the plugin takes a snapshot of the
    store's holdings (:meth:`NodeStore.holdings`, in memory, cheap), its counters
    (``stats``: :meth:`NodeStore.stats`) and the receives into its cache in progress
    (``fetching``: :func:`take_snapshot`), and sends it to the
    scheduler's ``dckpt_holdings`` handler when it changed, or when the last one sent
    is older than ``dckpt.registry.refresh``. A snapshot replaces the previous one on
    the scheduler, so a lost message costs nothing; a failed send is retried at the
    next tick. Polling rather than a hook in the store keeps the store free of
    scheduler code, at the price of up to one interval of delay.

    A scheduler without the dckpt scheduler plugin answers ``None`` (distributed logs
    "No handler dckpt_holdings found"): the plugin then stops reporting, once, and
    starts again when the scheduler side installs it anew.

    Before its first report it restores the store's registrations from the node's
    index (:meth:`NodeStore.restore`), so a restarted worker serves, and the registry
    lists, what its node still holds.

    Teardown (worker closing, or the plugin re-registered) stops the reporting but
    keeps the store: a plugin re-added by the scheduler side after a worker preload
    must not lose the directories registered in the meantime.
    """

    name = PLUGIN_NAME
    idempotent = True

    _reporter: asyncio.Task[None] | None = None

    def setup(self, worker: Worker) -> None:
        store = _compat.actor_instance(worker, STORE_KEY)
        if not isinstance(store, NodeStore):
            store = NodeStore(worker.address)
            _compat.set_actor_instance(worker, STORE_KEY, store)
            logger.info("dckpt store ready on %s", worker.address)
        store.attach(worker)
        _metrics.register_worker_metrics(store)  # in /metrics, if prometheus_client is there
        # setup runs in Worker.plugin_add, on the worker's event loop.
        self._reporter = asyncio.get_running_loop().create_task(
            _report_holdings(worker, store), name="dckpt-report-holdings"
        )

    def teardown(self, worker: Worker) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            self._reporter = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled by the scheduler side before setup; never ship a task.
        return {}


def take_snapshot(store: NodeStore) -> dict[str, Any]:
    """What the plugin reports: :meth:`NodeStore.holdings`, plus ``stats``
    (:meth:`NodeStore.stats`) and ``fetching``, the receives into this store's cache in
    progress: ``[{"checkpoint_id", "source", "done", "total"}]``.

    Downloads from a URI are not receives of :mod:`dckpt._transfer` and are not listed.
    """
    stats = store.stats()
    root = os.path.join(stats["cache"]["root"], "")
    fetching = [
        {"checkpoint_id": p.checkpoint_id, "source": p.source, "done": p.done,
         "total": p.total}
        for p in _transfer.receiving() if os.path.join(p.target, "").startswith(root)
    ]
    return {**store.holdings(), "stats": stats, "fetching": fetching}


async def _report_holdings(worker: Worker, store: NodeStore) -> None:
    """Serve again what the node's index lists, then send the store's holdings to the
    scheduler whenever they change (event loop)."""
    try:
        await store.restore()
    except Exception as e:  # noqa: BLE001 - a worker must start even if its disk is odd
        logger.warning("could not serve the checkpoints of the node's index again: %r", e)
    interval = parse_timedelta(dask.config.get("dckpt.registry.interval"), default="s")
    refresh = parse_timedelta(dask.config.get("dckpt.registry.refresh"), default="s")
    sent: dict[str, Any] | None = None
    sent_at = float("-inf")
    while True:
        snapshot = take_snapshot(store)
        if snapshot != sent or time.monotonic() - sent_at >= refresh:
            try:
                reply = await worker.scheduler.dckpt_holdings(
                    address=worker.address, node_id=store.node_id, holdings=snapshot
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - comm trouble: try again next tick
                logger.debug("Could not report dckpt holdings: %r", e)
                sent = None
            else:
                if reply is None:
                    logger.info(
                        "The scheduler has no dckpt plugin, so this worker's checkpoints "
                        "are not in a registry; install it with dckpt.cluster.install(client) "
                        "or start the scheduler with the dckpt preload"
                    )
                    return
                if reply.get("status") == "OK":
                    sent, sent_at = snapshot, time.monotonic()
                else:  # "unknown-worker": not registered yet (a preload runs before that)
                    sent = None
        await asyncio.sleep(interval)


def install(client: Client) -> None:
    """Same as :func:`dckpt.cluster.install`: the scheduler plugin, which installs this one."""
    # Imported here: the scheduler plugin imports this module for NodeStorePlugin.
    from dckpt.cluster._scheduler_plugin import install as install_both

    install_both(client)

