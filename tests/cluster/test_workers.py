"""``dckpt.cluster.worker_nodes``: the workers and their node ids, waiting for enough.

Two tiers. On the isolated :func:`node_cluster` (every worker a node of its own, its
store reporting to the registry): the answer, the wait that times out, the workers
that lack what is asked. In process (``gen_cluster``, as in
``test_scheduler_plugin.py``): which source each node id comes from, the registry or
the worker itself, which only a registry that lacks a worker can show; the function
is synchronous, so it runs in a thread with a client of its own.
"""

from __future__ import annotations

import asyncio

import pytest
from distributed import Client, LocalCluster

from dckpt import _node
from dckpt.cluster import NodeCluster, worker_nodes
from tests.cluster.test_scheduler_plugin import report, with_registry


def test_every_worker_by_its_node(node_cluster: NodeCluster, node_client: Client,
                                  node_stores: None) -> None:
    expected = {node.worker_address: node.node_id for node in node_cluster.nodes}
    assert worker_nodes(node_client) == expected
    assert worker_nodes(node_client, len(expected), timeout="1s") == expected
    # What is asked of a worker narrows the answer (each worker here has one thread).
    assert worker_nodes(node_client, nthreads=2) == {}
    assert worker_nodes(node_client, resources={"GPU": 0}) == expected


def test_too_few_workers_time_out_naming_the_setting(node_client: Client,
                                                     node_stores: None) -> None:
    have = len(node_client.nthreads())
    with pytest.raises(TimeoutError, match=rf"^the cluster has {have} workers after waiting "
                                           r"0\.1 s \(dckpt\.some\.timeout\)$"):
        worker_nodes(node_client, have + 1, timeout="100ms", setting="dckpt.some.timeout")
    with pytest.raises(TimeoutError, match=r"has 0 workers with 2 threads, GPU=1 after "
                                           r"waiting 0 s$"):
        worker_nodes(node_client, 1, nthreads=2, resources={"GPU": 1})


def _in_a_thread(address: str) -> dict[str, str]:
    with Client(address, set_as_default=False) as client:
        return worker_nodes(client)


@with_registry
async def test_the_registry_answers_and_a_worker_it_lacks_is_asked(c, s, workers, plugin):
    a, b, w = workers
    assert await report(c, a, "node-a") == "OK"
    assert await report(c, b, "node-b") == "OK"
    # As if w had just joined: the scheduler knows it, the registry has no snapshot.
    plugin.remove_worker(s, w.address, stimulus_id="test")
    nodes = await asyncio.to_thread(_in_a_thread, s.address)
    # a and b as the registry says (not what they would answer), w as it answers.
    assert nodes == {a.address: "node-a", b.address: "node-b", w.address: _node.node_id()}


@pytest.mark.slow
def test_a_cluster_without_the_registry_asks_its_workers() -> None:
    with LocalCluster(n_workers=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        assert worker_nodes(client) == client.run(_node.node_id)
