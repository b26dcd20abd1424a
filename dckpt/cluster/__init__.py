"""dckpt's Dask side: node stores, their worker plugin, and a local multi-node cluster.

- :func:`install` gives every worker of a cluster (present and future) a
  :class:`NodeStore`, an actor that serves directories registered on its node and
  caches checkpoints copied from other nodes; :func:`store_of` is a proxy to one,
  :func:`stats` reads every store's counters. It also sets up the scheduler's
  registry of who holds which checkpoint (:class:`DckptSchedulerPlugin`), read with
  :func:`who_has`, :func:`registry` and :func:`checkpoints` (per checkpoint: its
  size, holders and URIs).
- :func:`put` (also ``dckpt.put``) stages a checkpoint on chosen nodes;
  :class:`NodeRef` is what a node reference is
  (``Checkpoint.get_internal_representation()`` of an unresolved one).
- :class:`NodeCluster` is a local Dask cluster whose workers are simulated nodes,
  isolated in mount namespaces where possible, and on request in network namespaces
  of their own (``network=True``, ``link_rate="1gbit"``).
"""

from __future__ import annotations

from dckpt.cluster._core import NodeRef
from dckpt.cluster._local import (
    IsolationUnavailableWarning,
    NetworkIsolationUnavailableWarning,
    NodeCluster,
    NodeInfo,
    isolation_available,
    network_isolation_available,
)
from dckpt.cluster._put import put
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
    "NodeRef",
    "NodeStore",
    "NodeStorePlugin",
    "install",
    "isolation_available",
    "network_isolation_available",
    "put",
    "registry",
    "stats",
    "store_of",
    "who_has",
]
