"""dckpt's Dask side: node stores, their worker plugin, and a local multi-node cluster.

- :func:`install` gives every worker of a cluster (present and future) a
  node store, an actor that serves directories registered on its node and caches
  checkpoints copied from other nodes (:class:`NodeStorePlugin` installs it);
  :func:`stats` reads every store's counters. ``dckpt.put`` stages a checkpoint on
  chosen nodes ahead of its use. It also sets up the scheduler's
  registry of who holds which checkpoint (:class:`DckptSchedulerPlugin`), read with
  :func:`who_has`, :func:`registry` and :func:`checkpoints` (per checkpoint: its
  size, holders and URIs). :func:`worker_nodes` gives each worker's node id, waiting
  for enough workers if asked.
- :class:`NodeRef` is what a node reference is
  (``Checkpoint.get_internal_representation()`` of an unresolved one).
- :class:`NodeCluster` is a local Dask cluster whose workers are simulated nodes,
  isolated in mount namespaces where possible, and on request in network namespaces
  of their own (``network=True``, ``link_rate="1gbit"``).
"""

from __future__ import annotations

from dckpt.cluster._core import NodeRef
from dckpt.cluster._isolation import (
    IsolationUnavailableWarning,
    NetworkIsolationUnavailableWarning,
    isolation_available,
    network_isolation_available,
)
from dckpt.cluster._node_cluster import NodeCluster, NodeInfo
from dckpt.cluster._scheduler_plugin import (
    DckptSchedulerPlugin,
    checkpoints,
    install,
    registry,
    who_has,
)
from dckpt.cluster._store import stats
from dckpt.cluster._worker_plugin import NodeStorePlugin
from dckpt.cluster._workers import worker_nodes

__all__ = [
    "DckptSchedulerPlugin",
    "checkpoints",
    "IsolationUnavailableWarning",
    "NetworkIsolationUnavailableWarning",
    "NodeCluster",
    "NodeInfo",
    "NodeRef",
    "NodeStorePlugin",
    "install",
    "isolation_available",
    "network_isolation_available",
    "registry",
    "stats",
    "who_has",
    "worker_nodes",
]
