"""dckpt's Dask side: the node stores, their plugins, and a local multi-node cluster.

Only :class:`NodeCluster` (and what describes it) is here so far: a local Dask cluster
whose workers are simulated nodes, isolated in mount namespaces where possible.
"""

from __future__ import annotations

from dckpt.cluster._local import (
    IsolationUnavailableWarning,
    NodeCluster,
    NodeInfo,
    isolation_available,
)

__all__ = ["IsolationUnavailableWarning", "NodeCluster", "NodeInfo", "isolation_available"]
