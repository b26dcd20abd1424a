"""dckpt's Prometheus metrics, in the ``/metrics`` of distributed's workers and scheduler.

distributed serves ``prometheus_client.REGISTRY`` (the process's default registry) at
``/metrics`` of every server with an HTTP server (the dashboard address), so a
collector registered there shows up beside distributed's own metrics:

- on a worker, :func:`register_worker_metrics` (called by the worker plugin at setup)
  exports each node store's counters (:meth:`~dckpt.cluster._store.NodeStore.stats`):
  counters ``dckpt_bytes_sent_total``, ``dckpt_bytes_received_total``,
  ``dckpt_bytes_reused_total``, ``dckpt_transfers_total``, ``dckpt_chunks_sent_total``,
  ``dckpt_cache_hits_total``,
  ``dckpt_cache_misses_total``, ``dckpt_cache_evictions_total``; gauges
  ``dckpt_cache_bytes``, ``dckpt_cache_max_bytes``, ``dckpt_cache_entries``,
  ``dckpt_cache_pinned`` and ``dckpt_registered_checkpoints``;
- on the scheduler, :func:`register_scheduler_metrics` (called by the scheduler plugin
  at start) exports the registry: ``dckpt_checkpoints`` (distinct checkpoints any
  worker holds), ``dckpt_checkpoint_holdings`` (checkpoints a node holds, by ``kind``
  ``origin`` or ``cached``) and ``dckpt_transfers_in_progress``.

Every per-node series has the labels ``node`` (the node id) and ``worker`` (its
address: several workers may share a node). The names carry dckpt's own prefix, not
distributed's ``distributed.dashboard.prometheus.namespace``, so that they read the
same whatever that is set to. Without ``prometheus_client`` nothing is registered, as
distributed then serves no metrics either.

One collector per process and side, registered once: it reads every store (or
registry) of the process that is still alive when scraped, so that in-process test
clusters, with many workers in one process, export each worker once.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dckpt.cluster._store import NodeStore

__all__ = ["register_scheduler_metrics", "register_worker_metrics"]

logger = logging.getLogger(__name__)

#: (metric name, counter name in NodeStore.stats(), help): Prometheus counters.
_COUNTERS = (
    ("dckpt_bytes_sent", "bytes_sent", "Checkpoint bytes this node's store sent to others."),
    ("dckpt_bytes_received", "bytes_received",
     "Checkpoint bytes this node's store copied into its cache from other nodes."),
    ("dckpt_bytes_reused", "bytes_reused",
     "File bytes a copy into this node's cache took from files the cache already held."),
    ("dckpt_transfers", "transfers", "Checkpoints copied into this node's cache."),
    ("dckpt_chunks_sent", "chunks_sent", "Chunks this node's store sent."),
    ("dckpt_cache_hits", "cache_hits",
     "Requests for a checkpoint that this node's cache already held."),
    ("dckpt_cache_misses", "cache_misses",
     "Requests for a checkpoint that had to be copied into this node's cache."),
)
#: (metric name, key of NodeStore.stats()["cache"], help): Prometheus gauges.
_CACHE_GAUGES = (
    ("dckpt_cache_bytes", "bytes_cached", "Bytes in this node's checkpoint cache."),
    ("dckpt_cache_max_bytes", "max_bytes", "The byte budget of this node's cache."),
    ("dckpt_cache_entries", "entries", "Checkpoints in this node's cache."),
    ("dckpt_cache_pinned", "pinned", "Cached checkpoints in use (kept from eviction)."),
)
_LABELS = ["node", "worker"]


class _Registry(Protocol):
    """What the scheduler collector reads (:class:`DckptSchedulerPlugin`)."""

    def nodes(self) -> list[dict[str, Any]]: ...


class _WorkerCollector:
    """Every live node store of this process, as Prometheus metrics."""

    def __init__(self) -> None:
        self.stores: weakref.WeakSet[NodeStore] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = {name: CounterMetricFamily(name, text, labels=_LABELS)
                    for name, _, text in _COUNTERS}
        evictions = CounterMetricFamily(
            "dckpt_cache_evictions", "Checkpoints this node's store evicted from its cache.",
            labels=_LABELS)
        gauges = {name: GaugeMetricFamily(name, text, labels=_LABELS)
                  for name, _, text in _CACHE_GAUGES}
        registered = GaugeMetricFamily(
            "dckpt_registered_checkpoints", "Directories this node's store serves.",
            labels=_LABELS)
        for store in sorted(self.stores, key=lambda s: (s.node_id, s.address or "")):
            try:
                stats = store.stats()
            except Exception as e:  # noqa: BLE001 - a scrape must not fail for one store
                logger.debug("no dckpt metrics from the store of %s: %r", store.address, e)
                continue
            labels = [store.node_id, store.address or ""]
            for name, key, _ in _COUNTERS:
                counters[name].add_metric(labels, stats.get(key, 0))
            for name, key, _ in _CACHE_GAUGES:
                gauges[name].add_metric(labels, stats["cache"].get(key, 0))
            evictions.add_metric(labels, stats["cache"].get("evictions", 0))
            registered.add_metric(labels, stats.get("registered", 0))
        yield from counters.values()
        yield evictions
        yield from gauges.values()
        yield registered


class _SchedulerCollector:
    """The scheduler's registry (the last registry started in this process)."""

    def __init__(self) -> None:
        self.registry: weakref.ref[_Registry] | None = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        checkpoints = GaugeMetricFamily(
            "dckpt_checkpoints", "Distinct checkpoints that some worker holds.")
        holdings = GaugeMetricFamily(
            "dckpt_checkpoint_holdings",
            "Checkpoints a node holds: origin (directories it serves) or cached.",
            labels=[*_LABELS, "kind"])
        in_progress = GaugeMetricFamily(
            "dckpt_transfers_in_progress", "Checkpoints a node is receiving now.",
            labels=_LABELS)
        registry = self.registry() if self.registry is not None else None
        if registry is not None:
            ids: set[str] = set()
            for node in registry.nodes():
                if node["node_id"] is None:
                    continue
                labels = [node["node_id"], node["address"]]
                for kind in ("origin", "cached"):
                    holdings.add_metric([*labels, kind], len(node[kind]))
                    ids.update(node[kind])
                in_progress.add_metric(labels, len(node["fetching"]))
            checkpoints.add_metric([], len(ids))
        yield checkpoints
        yield holdings
        yield in_progress


_lock = threading.Lock()
_worker_collector: _WorkerCollector | None = None
_scheduler_collector: _SchedulerCollector | None = None


def _register(collector: Any) -> bool:
    try:
        import prometheus_client
    except ImportError:
        return False
    prometheus_client.REGISTRY.register(collector)
    return True


def register_worker_metrics(store: NodeStore) -> None:
    """Export ``store``'s counters in this process's ``/metrics`` (once per store)."""
    global _worker_collector
    with _lock:
        if _worker_collector is None:
            collector = _WorkerCollector()
            if not _register(collector):
                return
            _worker_collector = collector
        _worker_collector.stores.add(store)


def register_scheduler_metrics(registry: _Registry) -> None:
    """Export ``registry``'s figures in this process's ``/metrics``."""
    global _scheduler_collector
    with _lock:
        if _scheduler_collector is None:
            collector = _SchedulerCollector()
            if not _register(collector):
                return
            _scheduler_collector = collector
        _scheduler_collector.registry = weakref.ref(registry)
