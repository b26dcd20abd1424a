"""Fixtures of an isolated three-node NodeCluster, one per test module that imports them.

``from tests._three_nodes import cluster, client, workers`` in a test module gives it
its own cluster (module scope), so that kills and restarts stay within the module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from distributed import Client

from dckpt.cluster import (
    NodeCluster,
    install,
    isolation_available,
    network_isolation_available,
)
from tests._clean import assert_nodes_clean


@pytest.fixture(scope="module")
def cluster() -> Iterator[NodeCluster]:
    """An isolated NodeCluster of three nodes for this module."""
    if not isolation_available():
        pytest.skip("node isolation (mount namespaces) is not available here")
    with NodeCluster(3, isolate=True, network=network_isolation_available()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster: NodeCluster) -> Client:
    """The cluster's client (not the default one), with dckpt installed."""
    client = cluster.client(set_as_default=False)
    install(client)
    return client


@pytest.fixture
def workers(cluster: NodeCluster, client: Client) -> Iterator[list[str]]:
    """The workers' addresses, read for each test: a restarted node has a new one.
    After the test every node must be clean (:func:`tests._clean.assert_nodes_clean`)."""
    yield [n.worker_address for n in cluster.nodes]
    assert_nodes_clean(client, [n.worker_address for n in cluster.nodes])
