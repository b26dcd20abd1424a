"""Fixtures of an isolated two-node NodeCluster with HTTP servers (dashboard, /metrics),
one per test module that imports them.

``from tests._web_nodes import cluster, client`` gives a module its own cluster whose
scheduler serves the Dask dashboard and whose workers serve ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from distributed import Client

from dckpt.cluster import NodeCluster, install, isolation_available


@pytest.fixture(scope="module")
def cluster() -> Iterator[NodeCluster]:
    """An isolated NodeCluster of two nodes with HTTP servers, for this module."""
    if not isolation_available():
        pytest.skip("node isolation (mount namespaces) is not available here")
    with NodeCluster(2, isolate=True, dashboard=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster: NodeCluster) -> Client:
    """The cluster's client (not the default one), with dckpt installed."""
    client = cluster.client(set_as_default=False)
    install(client)
    return client
