"""The scheduler side: a registry of which workers hold which checkpoints.

:class:`DckptSchedulerPlugin` runs in the scheduler. It installs the worker side
(:class:`~dckpt.cluster._worker_plugin.NodeStorePlugin`) on every present and future
worker, so that one call (:func:`install`) or one ``--preload`` sets up a cluster, and
it keeps, per worker, the last *snapshot* of what that worker's store holds:

- ``origin``: checkpoints registered on that worker (directories it serves), with the
  URIs they are known at and whether a restarted worker ``restored`` them;
- ``cached``: complete copies in that node's cache, which it serves on too;
- ``serving``: how many transfers it is sending now.

Checkpoint ids are ids of content (:mod:`dckpt._transfer._manifest`), so every holder
of an id holds the same bytes. From the snapshots the registry answers, per checkpoint
id, which nodes hold a complete copy and at which worker address each node is now
(``dckpt_holders``: what resolution asks, :meth:`dckpt.cluster._store.NodeStore.materialize`), and per
checkpoint its size, holders and URIs (``dckpt_checkpoints``, :func:`checkpoints`).

How snapshots flow: each worker's plugin polls its store every
``dckpt.registry.interval`` and sends the whole snapshot to the ``dckpt_holdings``
handler when it changed (and at least every ``dckpt.registry.refresh``). A new
snapshot replaces the old one; a worker that leaves is dropped in :meth:`remove_worker`,
and a late snapshot from a worker the scheduler no longer knows is ignored. So the
registry lags the truth by about one interval and never keeps a dead worker.

Clients read it with :func:`who_has` (``dckpt_who_has``) and :func:`registry`
(``dckpt_registry``): the means to place predictors and tasks where the data is.

Snapshots also carry each store's counters (``stats``), its pinned cache entries and
its receives in progress (``fetching``), so that code on the scheduler — the
dashboard's checkpoints page, the Prometheus metrics — reads them without a call to
any worker: :meth:`DckptSchedulerPlugin.nodes`, :meth:`~DckptSchedulerPlugin.transfers`
and :meth:`~DckptSchedulerPlugin.rates` (each node's transfer rate over the last
minutes, from successive snapshots' byte counters).

Handlers run on the scheduler's event loop and only touch in-memory dicts.
"""

from __future__ import annotations

import collections
import importlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps

from dckpt.cluster import _metrics
from dckpt.cluster._broadcast import Fetchers
from dckpt.cluster._cache import CheckpointId
from dckpt.cluster._worker_plugin import PLUGIN_NAME, NodeStorePlugin

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, WorkerState

logger = logging.getLogger(__name__)

#: What a worker holds (:meth:`dckpt.cluster._store.NodeStore.holdings`):
#: ``{"origin": {id: bytes}, "cached": {id: bytes}, "uris": {id: [uri]},
#: "restored": [id], "serving": n}``.
Holdings = dict[str, Any]
KINDS = ("origin", "cached")
#: How many snapshots' byte counters :meth:`DckptSchedulerPlugin.rates` keeps per node:
#: ten minutes at the default interval of 1 s.
HISTORY = 600


@dataclass(frozen=True)
class _Snapshot:
    """The last report of one worker."""

    node_id: str
    origin: dict[CheckpointId, int]
    cached: dict[CheckpointId, int]
    received: float  # time.monotonic() on the scheduler
    uris: dict[CheckpointId, tuple[str, ...]] = field(default_factory=dict)
    restored: frozenset[CheckpointId] = frozenset()
    serving: int = 0
    pinned: frozenset[CheckpointId] = frozenset()
    stats: dict[str, Any] = field(default_factory=dict)
    fetching: tuple[dict[str, Any], ...] = ()
    received_at: float = 0.0  # time.time(), for plots

    def held(self) -> set[CheckpointId]:
        return set(self.origin) | set(self.cached)


class DckptSchedulerPlugin(SchedulerPlugin):
    """Keeps the registry of checkpoint holdings and installs the worker side.

    Add it with :func:`install` (from a client) or ``scheduler.add_plugin(...)`` in a
    scheduler preload (``scheduler/dckpt_scheduler_preload.py``). Named ``"dckpt"``,
    like its worker half; its handlers are ``dckpt_holdings``, ``dckpt_who_has`` and
    ``dckpt_registry``.

    Notes
    -----
    Scale-down: :meth:`valid_workers_downscaling` keeps a worker that is the last
    holder of a checkpoint registered somewhere in the cluster (see
    ``dckpt.registry.keep-sole-holders``). distributed 2026.8 consults this hook in
    ``Scheduler.workers_to_close`` (adaptive scaling, ``retire_workers()`` without
    arguments) only: ``retire_workers(workers=...)`` or ``names=...`` retires whom it
    is told to.
    """

    name = PLUGIN_NAME
    idempotent = True

    _scheduler: Scheduler | None
    _snapshots: dict[str, _Snapshot]
    _fetchers: Fetchers
    # Per (node id, worker address): (time.time(), bytes sent, bytes received), oldest
    # first. Per worker: the counters are a store's, and a node may have several.
    _history: dict[tuple[str, str], collections.deque[tuple[float, int, int]]]

    def __init__(self) -> None:
        self._scheduler = None
        self._snapshots = {}
        self._fetchers = Fetchers()
        self._history = {}

    async def start(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        # Handlers first: the workers start reporting as soon as the plugin is theirs.
        scheduler.handlers.update({
            "dckpt_holdings": self.dckpt_holdings,
            "dckpt_who_has": self.dckpt_who_has,
            "dckpt_registry": self.dckpt_registry,
            "dckpt_holders": self.dckpt_holders,
            "dckpt_checkpoints": self.dckpt_checkpoints,
        })
        responses = await scheduler.register_worker_plugin(
            None, dumps(NodeStorePlugin()), name=PLUGIN_NAME, idempotent=True
        )
        for address, response in responses.items():
            if response.get("status") != "OK":
                logger.error("dckpt worker plugin failed on %s: %s", address,
                             response.get("exception_text", response))
        _metrics.register_scheduler_metrics(self)  # in /metrics, if prometheus_client is there
        _add_dashboard_page(scheduler)
        logger.info("dckpt registry ready on %s", scheduler.address)

    # ------------------------------------------------------------------ handlers

    def dckpt_holdings(self, address: str, node_id: str, holdings: Holdings) -> dict[str, str]:
        """A worker's snapshot of what it holds; replaces its previous one."""
        assert self._scheduler is not None
        if address not in self._scheduler.workers:
            # Not registered yet, or already removed: a late message must not bring
            # a dead worker back.
            return {"status": "unknown-worker"}
        snapshot = _Snapshot(
            node_id=node_id,
            origin=dict(holdings.get("origin", {})),
            cached=dict(holdings.get("cached", {})),
            received=time.monotonic(),
            uris={cid: tuple(uris) for cid, uris in dict(holdings.get("uris", {})).items()},
            restored=frozenset(holdings.get("restored", ())),
            serving=int(holdings.get("serving", 0)),
            pinned=frozenset(holdings.get("pinned", ())),
            stats=dict(holdings.get("stats") or {}),
            fetching=tuple(dict(f) for f in holdings.get("fetching", ())),
            received_at=time.time(),
        )
        self._snapshots[address] = snapshot
        if snapshot.stats:
            # Bytes of receives in progress count as received: the counter itself
            # grows only when a transfer completes, which would make a spike of it.
            received = int(snapshot.stats.get("bytes_received", 0)) + sum(
                int(f.get("done", 0)) for f in snapshot.fetching)
            self._history.setdefault((node_id, address), collections.deque(maxlen=HISTORY)).append(
                (snapshot.received_at, int(snapshot.stats.get("bytes_sent", 0)), received))
        interval = parse_timedelta(dask.config.get("dckpt.registry.interval"), default="s")
        busy = {CheckpointId(str(cid)) for cid in holdings.get("obtaining", ())} | {
            CheckpointId(str(f.get("checkpoint_id"))) for f in snapshot.fetching}
        self._fetchers.reported(address, snapshot.held(), busy, grace=2 * interval)
        return {"status": "OK"}

    def dckpt_holders(
        self, checkpoint_id: CheckpointId, node_id: str | None = None,
        address: str | None = None, asker: str | None = None, asker_node: str | None = None,
    ) -> dict[str, Any]:
        """Who can send ``checkpoint_id`` now, for a reference made on ``node_id`` at
        the worker ``address``.

        ``asker`` (a worker's store about to copy it in, on ``asker_node``) is recorded
        as fetching it; the answer starts with the fetcher it should pull from, if
        another reader is receiving it now (:class:`~dckpt.cluster._broadcast.Fetchers`).

        ``{"holders": [{"address", "node_id", "kind", "serving"}, ...],
        "node_addresses": [current workers of node_id], "address_alive": bool}``:
        every worker whose last snapshot holds the id (``kind`` ``origin`` or
        ``cached``), the workers that node has now (a restarted worker has a new
        address), and whether ``address`` is still a worker of the cluster (the
        scheduler's own list, which does not lag like the snapshots).
        """
        assert self._scheduler is not None
        holders = self._fetchers.ask(checkpoint_id, asker, asker_node)
        for worker in sorted(self._snapshots):
            snapshot = self._snapshots[worker]
            for kind in KINDS:
                if checkpoint_id in getattr(snapshot, kind):
                    holders.append({"address": worker, "node_id": snapshot.node_id,
                                    "kind": kind, "serving": snapshot.serving})
                    break
        return {
            "holders": holders,
            "node_addresses": sorted(w for w, s in self._snapshots.items()
                                     if node_id is not None and s.node_id == node_id),
            "address_alive": address is not None and address in self._scheduler.workers,
        }

    def dckpt_checkpoints(self) -> dict[str, dict[str, Any]]:
        """Per checkpoint id any worker holds: ``size``, ``holders`` and ``uris``.

        ``holders``: ``[{"node_id", "address", "kind"}]``, where ``kind`` is
        ``origin``, ``cached`` or ``restarted`` (an origin a restarted worker serves
        again); ``uris``: every URI a holder knows it at.
        """
        answer: dict[str, dict[str, Any]] = {}
        for worker in sorted(self._snapshots):
            snapshot = self._snapshots[worker]
            for kind in KINDS:
                for cid, size in getattr(snapshot, kind).items():
                    entry = answer.setdefault(cid, {"size": size, "holders": [], "uris": []})
                    shown = "restarted" if kind == "origin" and cid in snapshot.restored else kind
                    entry["holders"].append({"node_id": snapshot.node_id, "address": worker,
                                             "kind": shown})
                    for uri in snapshot.uris.get(cid, ()):
                        if uri not in entry["uris"]:
                            entry["uris"].append(uri)
        return answer

    def dckpt_who_has(self, checkpoint_ids: list[CheckpointId]) -> dict[str, dict[str, list[str]]]:
        """``{checkpoint_id: {"origin": [addresses], "cached": [addresses]}}``.

        Every id asked for is in the answer; one no worker holds has empty lists.
        """
        # A scan of every snapshot: fine for the hundreds of workers and checkpoints
        # this is for; an inverted index would have to be rebuilt per snapshot anyway.
        answer: dict[str, dict[str, list[str]]] = {
            cid: {kind: [] for kind in KINDS} for cid in checkpoint_ids
        }
        for address in sorted(self._snapshots):
            snapshot = self._snapshots[address]
            for cid, places in answer.items():
                if cid in snapshot.origin:
                    places["origin"].append(address)
                if cid in snapshot.cached:
                    places["cached"].append(address)
        return answer

    def dckpt_registry(self) -> dict[str, dict[str, Any]]:
        """Per worker the scheduler knows: node id, holdings, age of the snapshot.

        A worker that has not reported yet has ``node_id`` and ``age`` ``None`` and
        empty holdings.
        """
        assert self._scheduler is not None
        now = time.monotonic()
        answer: dict[str, dict[str, Any]] = {}
        for address in sorted(self._scheduler.workers):
            snapshot = self._snapshots.get(address)
            if snapshot is None:
                answer[address] = {"node_id": None, "origin": {}, "cached": {}, "age": None}
            else:
                answer[address] = {
                    "node_id": snapshot.node_id,
                    "origin": dict(snapshot.origin),
                    "cached": dict(snapshot.cached),
                    "age": now - snapshot.received,
                }
        return answer

    # ------------------------------------------------- read on the scheduler itself

    def nodes(self) -> list[dict[str, Any]]:
        """Per worker of the cluster, what its last snapshot says (event loop).

        ``[{"address", "node_id", "age", "origin", "cached", "pinned", "serving",
        "stats", "fetching"}]`` sorted by node id then address: ``origin`` and
        ``cached`` map ids to bytes, ``pinned`` lists ids, ``stats`` is the store's
        :meth:`~dckpt.cluster._store.NodeStore.stats` (empty for a worker whose store sent
        none), ``fetching`` its receives in progress. A worker that has not reported
        yet has ``node_id`` and ``age`` None and nothing else.
        """
        assert self._scheduler is not None
        now = time.monotonic()
        answer: list[dict[str, Any]] = []
        for address in self._scheduler.workers:
            snapshot = self._snapshots.get(address)
            if snapshot is None:
                answer.append({"address": address, "node_id": None, "age": None,
                               "origin": {}, "cached": {}, "pinned": [], "serving": 0,
                               "stats": {}, "fetching": []})
                continue
            answer.append({
                "address": address, "node_id": snapshot.node_id,
                "age": now - snapshot.received, "origin": dict(snapshot.origin),
                "cached": dict(snapshot.cached), "pinned": sorted(snapshot.pinned),
                "serving": snapshot.serving, "stats": snapshot.stats,
                "fetching": [dict(f) for f in snapshot.fetching],
            })
        answer.sort(key=lambda n: (n["node_id"] is None, n["node_id"] or "", n["address"]))
        return answer

    def transfers(self) -> list[dict[str, Any]]:
        """Receives in progress, as the last snapshots say (event loop).

        ``[{"checkpoint_id", "to_node", "to_address", "source", "done", "total"}]``:
        ``source`` names the sender as the receiver does (``the store of node node-0
        at tcp://...``).
        """
        return [
            {"checkpoint_id": f.get("checkpoint_id"), "to_node": s.node_id,
             "to_address": address, "source": f.get("source", ""),
             "done": int(f.get("done", 0)), "total": int(f.get("total", 0))}
            for address, s in sorted(self._snapshots.items()) for f in s.fetching
        ]

    def rates(self, seconds: float = 300.0) -> dict[str, dict[str, list[float]]]:
        """Each node's transfer rate over the last ``seconds``, from its snapshots.

        ``{label: {"time": [seconds since the epoch], "sent": [bytes/s],
        "received": [bytes/s]}}``, one series per worker, labelled by its node id
        (``node-0 at tcp://...`` where a node had several workers in that time: a
        restarted one, or ``--nworkers``). A worker sends a snapshot only when
        something changed (and every ``dckpt.registry.refresh``): its counters changed
        within the one ``dckpt.registry.interval`` before a snapshot, so each change is
        spread over that interval, and the rest of a gap between snapshots reads as
        zero. Workers gone for longer than ``seconds`` are forgotten.
        """
        interval = parse_timedelta(dask.config.get("dckpt.registry.interval"), default="s")
        interval = max(float(interval or 0), 1e-3)
        now = time.time()
        for key in [k for k, samples in self._history.items() if samples[-1][0] < now - seconds
                    and k[1] not in self._snapshots]:
            del self._history[key]
        workers_of: dict[str, int] = collections.Counter(node for node, _ in self._history)
        answer: dict[str, dict[str, list[float]]] = {}
        for (node_id, address), samples in sorted(self._history.items()):
            times: list[float] = []
            sent: list[float] = []
            received: list[float] = []
            previous: tuple[float, int, int] | None = None
            for sample in samples:
                t, s, r = sample
                if previous is not None and t >= now - seconds:
                    t0, s0, r0 = previous
                    if s < s0 or r < r0:  # not one store's counters: start again
                        s0 = r0 = 0
                    span = min(max(t - t0, 1e-3), interval)
                    if t - t0 > 1.5 * interval:  # flat from one interval after t0 to t - span
                        after = t0 + interval  # the end of the previous point's interval
                        for flat in ((after, t - span) if times and after < t - span
                                     else (t - span,)):
                            times.append(flat)
                            sent.append(0.0)
                            received.append(0.0)
                    times.append(t)
                    sent.append((s - s0) / span)
                    received.append((r - r0) / span)
                previous = sample
            if times and now - times[-1] > 1.5 * interval:
                for flat in (times[-1] + interval, now):
                    times.append(flat)
                    sent.append(0.0)
                    received.append(0.0)
            label = node_id if workers_of[node_id] == 1 else f"{node_id} at {address}"
            answer[label] = {"time": times, "sent": sent, "received": received}
        return answer

    # -------------------------------------------------------------------- hooks

    def remove_worker(
        self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        self._fetchers.forget_worker(worker)
        if self._snapshots.pop(worker, None) is not None:
            logger.debug("dropped the dckpt holdings of %s (%s)", worker, stimulus_id)

    def valid_workers_downscaling(
        self, scheduler: Scheduler, workers: list[WorkerState]
    ) -> list[WorkerState]:
        """The candidates that may go without taking the last copy of a checkpoint.

        A checkpoint counts while some worker has it registered (``origin``): the
        registry does not know whether it is also persisted at a URI, so it treats
        every one as if it were not. Cached copies count as copies. Candidates are
        taken in order; each is let go only if every counted checkpoint it holds keeps
        a holder among the workers that stay, so two holders of the same checkpoint
        are never retired together.
        """
        if not dask.config.get("dckpt.registry.keep-sole-holders"):
            return workers
        counted = {cid for s in self._snapshots.values() for cid in s.origin}
        holders: dict[CheckpointId, set[str]] = {cid: set() for cid in counted}
        for address, snapshot in self._snapshots.items():
            for cid in counted & snapshot.held():
                holders[cid].add(address)
        allowed = []
        for ws in workers:
            own = self._snapshots.get(ws.address)
            held = counted & own.held() if own is not None else set()
            if all(holders[cid] - {ws.address} for cid in held):
                allowed.append(ws)
                for cid in held:
                    holders[cid].discard(ws.address)
            else:
                logger.debug("keeping %s: the last holder of a dckpt checkpoint", ws.address)
        return allowed


def _add_dashboard_page(scheduler: Scheduler) -> None:
    """Add the page that ``dckpt.dashboard.page`` names to the scheduler's dashboard.

    The page is an app above this layer (:mod:`dckpt.dashboard`, needs bokeh): it is
    found by the name in that setting, not imported here, so that the registry stays
    below it and works without bokeh; ``null`` turns the page off.
    """
    name = dask.config.get("dckpt.dashboard.page")
    if not name:
        return
    module, _, function = str(name).partition(":")
    try:
        add_page = getattr(importlib.import_module(module), function or "add_page")
        add_page(scheduler)
    except Exception as e:  # noqa: BLE001 - the registry must work without its page
        logger.warning("could not add the dckpt dashboard page %s: %r", name, e)


# ----------------------------------------------------------------- client side


def install(client: Client) -> None:
    """Set up dckpt on ``client``'s cluster: the registry on the scheduler and a
    :class:`~dckpt.cluster._store.NodeStore` on every worker, present and future.

    Idempotent: a second call, or a call on a cluster started with the scheduler
    preload, changes nothing. The scheduler must be able to import dckpt.
    """
    client.register_plugin(DckptSchedulerPlugin())


def who_has(client: Client, checkpoint_ids: Iterable[str] | str) -> dict[str, dict[str, list[str]]]:
    """Which workers hold each checkpoint, as the scheduler's registry knows it.

    Parameters
    ----------
    client
        A client of a cluster set up with :func:`install` or the scheduler preload.
    checkpoint_ids
        Checkpoint ids (a single id may be given as a string).

    Returns
    -------
    dict
        ``{checkpoint_id: {"origin": [worker addresses], "cached": [worker addresses]}}``
        for every id asked for. ``origin``: workers that serve the checkpoint's
        directory; ``cached``: workers whose node cache holds a copy. The registry
        lags the workers by about ``dckpt.registry.interval``. With an asynchronous
        client, an awaitable of that.
    """
    ids = [checkpoint_ids] if isinstance(checkpoint_ids, str) else list(checkpoint_ids)
    result: dict[str, dict[str, list[str]]] = client.sync(_who_has, client, ids)
    return result


async def _who_has(client: Client, ids: list[str]) -> dict[str, dict[str, list[str]]]:
    answer = _checked(await client.scheduler.dckpt_who_has(checkpoint_ids=ids), "who_has")
    # Dask's msgpack turns lists into tuples on the way.
    return {cid: {kind: list(where) for kind, where in places.items()}
            for cid, places in answer.items()}


def registry(client: Client) -> dict[str, dict[str, Any]]:
    """Everything the scheduler's registry knows, by worker address.

    Returns
    -------
    dict
        ``{address: {"node_id": ..., "origin": {id: bytes}, "cached": {id: bytes},
        "age": seconds since the snapshot}}`` for every worker of the cluster;
        ``node_id`` and ``age`` are ``None`` for a worker that has not reported yet.
        With an asynchronous client, an awaitable of that.
    """
    result: dict[str, dict[str, Any]] = client.sync(_registry, client)
    return result


async def _registry(client: Client) -> dict[str, dict[str, Any]]:
    answer: dict[str, dict[str, Any]] = _checked(await client.scheduler.dckpt_registry(), "registry")
    return answer


def checkpoints(client: Client) -> dict[str, dict[str, Any]]:
    """Every checkpoint the scheduler's registry knows of, by checkpoint id.

    Returns
    -------
    dict
        ``{checkpoint_id: {"size": bytes, "holders": [{"node_id", "address",
        "kind"}], "uris": [uri, ...]}}``. ``kind`` is ``origin`` (the worker serves
        the directory it was made from), ``restarted`` (an origin that a restarted
        worker serves again from its node's index) or ``cached`` (a copy in that
        node's cache, served on as well). ``uris`` are those the origins know.
        With an asynchronous client, an awaitable of that.
    """
    result: dict[str, dict[str, Any]] = client.sync(_checkpoints, client)
    return result


async def _checkpoints(client: Client) -> dict[str, dict[str, Any]]:
    answer = _checked(await client.scheduler.dckpt_checkpoints(), "checkpoints")
    return {cid: {"size": entry["size"], "holders": [dict(h) for h in entry["holders"]],
                  "uris": list(entry["uris"])} for cid, entry in answer.items()}


def _checked(answer: Any, what: str) -> Any:
    if answer is None:  # distributed answers None for an op without a handler
        raise RuntimeError(
            f"dckpt.cluster.{what}: the scheduler has no dckpt plugin; set it up with "
            "dckpt.cluster.install(client), or start the scheduler with "
            "--preload scheduler/dckpt_scheduler_preload.py"
        )
    return answer
