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
    network_isolation_available,
)
from tests._clean import assert_nodes_clean
from tests._nodes import installed_client, isolated_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[NodeCluster]:
    """An isolated NodeCluster of three nodes for this module."""
    with isolated_cluster(3, network=network_isolation_available()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster: NodeCluster) -> Client:
    """The cluster's client (not the default one), with dckpt installed."""
    return installed_client(cluster)


@pytest.fixture
def workers(cluster: NodeCluster, client: Client) -> Iterator[list[str]]:
    """The workers' addresses, read for each test: a restarted node has a new one.
    After the test every node must be clean (:func:`tests._clean.assert_nodes_clean`)."""
    yield [n.worker_address for n in cluster.nodes]
    assert_nodes_clean(client, [n.worker_address for n in cluster.nodes])
