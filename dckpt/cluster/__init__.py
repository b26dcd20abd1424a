"""dckpt's Dask side: node stores, their worker plugin, and a local multi-node cluster.

- :func:`install` gives every worker of a cluster (present and future) a
  :class:`NodeStore`, an actor that serves directories registered on its node and
  caches checkpoints copied from other nodes; :func:`store_of` is a proxy to one,
  :func:`stats` reads every store's counters. It also sets up the scheduler's
  registry of who holds which checkpoint (:class:`DckptSchedulerPlugin`), read with
  :func:`who_has`, :func:`registry` and :func:`checkpoints` (per checkpoint: its
  size, holders and URIs).
- :class:`NodeCluster` is a local Dask cluster whose workers are simulated nodes,
  isolated in mount namespaces where possible, and on request in network namespaces
  of their own (``network=True``, ``link_rate="1gbit"``).
"""

from __future__ import annotations

from dckpt.cluster._local import (
    IsolationUnavailableWarning,
    NetworkIsolationUnavailableWarning,
    NodeCluster,
    NodeInfo,
    isolation_available,
    network_isolation_available,
)
from dckpt.cluster._scheduler_plugin import (
    DckptSchedulerPlugin,
    checkpoints,
    install,
    registry,
    who_has,
)
from dckpt.cluster._store import NodeStore, stats, store_of
from dckpt.cluster._worker_plugin import NodeStorePlugin

__all__ = [
    "DckptSchedulerPlugin",
    "checkpoints",
    "IsolationUnavailableWarning",
    "NetworkIsolationUnavailableWarning",
    "NodeCluster",
    "NodeInfo",
    "NodeStore",
    "NodeStorePlugin",
    "install",
    "isolation_available",
    "network_isolation_available",
    "registry",
    "stats",
    "store_of",
    "who_has",
]
