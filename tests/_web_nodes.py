"""Fixtures of an isolated two-node NodeCluster with HTTP servers (dashboard, /metrics),
one per test module that imports them.

``from tests._web_nodes import cluster, client`` gives a module its own cluster whose
scheduler serves the Dask dashboard and whose workers serve ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from distributed import Client

from dckpt.cluster import NodeCluster
from tests._nodes import installed_client, isolated_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[NodeCluster]:
    """An isolated NodeCluster of two nodes with HTTP servers, for this module."""
    with isolated_cluster(2, dashboard=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster: NodeCluster) -> Client:
    """The cluster's client (not the default one), with dckpt installed."""
    return installed_client(cluster)
