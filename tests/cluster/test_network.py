"""NodeCluster(network=True): each node in a network namespace of its own, on a bridge.

One module-scoped two-node cluster with 1gbit links (a cluster start costs seconds);
the tests that need a cluster of their own (leftovers, fallback) start one node.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import socket
import subprocess
import uuid
from collections.abc import Iterator

import dask.config
import pytest
from distributed import Client

import dckpt._node
from dckpt import Checkpoint
from dckpt.cluster import (
    NetworkIsolationUnavailableWarning,
    NodeCluster,
    NodeInfo,
    _netns,
    isolation_available,
    network_isolation_available,
    stats,
)
from dckpt.errors import IsolationUnavailableError
from tests._nodes import alive, child_pids, cluster_pids, installed_client

SIZE = 1 << 20

needs_network = pytest.mark.skipif(
    not (isolation_available() and network_isolation_available(link_rate=True)),
    reason="network namespaces, tc tbf or mount namespaces are not available here",
)


def _ip(*args: str) -> list[dict]:
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True,
                                     check=True).stdout or "[]")


def _names(tag: str) -> list[str]:
    """Every namespace and interface of this machine whose name starts with ``tag``."""
    names = [n["name"] for n in _ip("netns", "list")] + [n["ifname"] for n in _ip("link", "show")]
    return [n for n in names if n.startswith(tag)]


def _on(client: Client, info: NodeInfo, func, *args):
    return client.submit(func, *args, workers=[info.worker_address], pure=False).result()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _configured_node_id() -> object:
    return dask.config.get("dckpt.node-id", None), os.environ.get("DASK_DCKPT__NODE_ID")


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def _make_checkpoint(seed: int) -> Checkpoint:
    path = os.path.join(dckpt._node.node_root(), f"model-{seed}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(random.Random(seed).randbytes(SIZE))
    return Checkpoint.from_directory(path)


def _use(checkpoint: Checkpoint) -> bytes:
    with checkpoint.as_directory() as directory, \
            open(os.path.join(directory, "weights.bin"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def net_cluster() -> Iterator[NodeCluster]:
    if not (isolation_available() and network_isolation_available(link_rate=True)):
        pytest.skip("network namespaces, tc tbf or mount namespaces are not available here")
    cluster = NodeCluster(2, isolate=True, network=True, link_rate="1gbit")
    assert cluster.network is not None
    tag = cluster.network.tag
    try:
        yield cluster
    finally:
        pids = cluster_pids(cluster)
        cluster.close()
    # Nothing left behind: no process, no namespace, bridge or veth, no files.
    assert not any(alive(pid) for pid in pids)
    assert _names(tag) == []
    assert not os.path.exists(cluster.root)


@pytest.fixture(scope="module")
def net_client(net_cluster: NodeCluster) -> Client:
    return installed_client(net_cluster)


# -- the shared two-node cluster ------------------------------------------------------


def test_each_node_has_its_own_address_in_the_cluster_range(net_cluster, net_client):
    network = net_cluster.network
    assert network.subnet.subnet_of(_netns.SUBNETS)
    hosts = [ipaddress.ip_address(n.worker_address.split("://")[1].rsplit(":", 1)[0])
             for n in net_cluster.nodes]
    assert len(set(hosts)) == 2 and all(h in network.subnet for h in hosts)
    assert [str(h) for h in hosts] == [link.address for link in network.links]
    assert net_cluster.scheduler_address.startswith(f"tcp://{network.host_address}:")
    assert set(net_client.scheduler_info()["workers"]) == {
        n.worker_address for n in net_cluster.nodes
    }
    # nsenter, unshare and sh exec: the process the cluster started is the worker.
    assert net_client.run(os.getpid) == {n.worker_address: n.pid for n in net_cluster.nodes}
    assert [net_cluster._state.workers[i].pid for i in range(2)] == [
        n.pid for n in net_cluster.nodes
    ]
    # A node's routes lead into its /24 only: nothing it sends can leave the bridge.
    for link in network.links:
        routes = _ip("-n", link.namespace, "-4", "route", "show")
        assert routes and all(
            ipaddress.ip_network(r["dst"]).subnet_of(network.subnet) for r in routes
        ), routes


def test_host_name_is_the_nodes_and_the_default_node_id(net_cluster, net_client):
    expected = {n.worker_address: n.node_id for n in net_cluster.nodes}
    assert net_client.run(socket.gethostname) == expected
    # Not configured: node_id() falls back to the host name, as on a real machine.
    assert set(net_client.run(_configured_node_id).values()) == {(None, None)}
    assert net_client.run(dckpt._node.node_id) == expected
    # /etc/hosts in each node names every node.
    node1 = net_cluster.network.links[1]
    assert set(net_client.run(socket.gethostbyname, "node-1").values()) == {node1.address}
    assert socket.gethostname() not in expected.values()  # the driver keeps its own


def test_nodes_do_not_share_the_loopback(net_cluster, net_client):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert _connects(port)  # the driver reaches its own loopback
        assert set(net_client.run(_connects, port).values()) == {False}


def test_a_file_written_on_one_node_exists_only_there(net_cluster, net_client):
    node0, node1 = net_cluster.nodes
    path = os.path.join(node0.root, f"only-on-node-0-{uuid.uuid4().hex}")
    _on(net_client, node0, _write, path, "written on node 0")
    assert _on(net_client, node0, _read, path) == "written on node 0"
    assert _on(net_client, node1, _read, path) is None
    assert _read(path) is None


def test_a_checkpoint_crosses_the_network_once(net_cluster, net_client):
    node0, node1 = net_cluster.nodes
    checkpoint = _on(net_client, node0, _make_checkpoint, 7)
    assert checkpoint.get_internal_representation()[1].node_id == "node-0"
    before = stats(net_client)[node1.worker_address]

    assert _on(net_client, node1, _use, checkpoint) == random.Random(7).randbytes(SIZE)

    after = stats(net_client)[node1.worker_address]
    assert after["transfers"] - before["transfers"] == 1
    assert after["bytes_received"] - before["bytes_received"] == SIZE


def test_link_rate_is_a_tbf_on_both_ends_of_each_veth(net_cluster):
    for link in net_cluster.network.links:
        for where in ([], ["-n", link.namespace]):
            device = "eth0" if where else link.veth
            shown = subprocess.run(["tc", *where, "qdisc", "show", "dev", device],
                                   capture_output=True, text=True, check=True).stdout
            assert "qdisc tbf" in shown and "rate 1Gbit" in shown, (where, device, shown)
        master = _ip("link", "show", link.veth)[0].get("master")
        assert master == net_cluster.network.bridge


@pytest.mark.slow
def test_a_restarted_node_keeps_its_namespace_and_address(net_cluster, net_client):
    before = net_cluster.nodes[1]
    path = os.path.join(before.root, f"survives-{uuid.uuid4().hex}")
    _on(net_client, before, _write, path, "before")

    after = net_cluster.restart_node(1)

    assert after.pid != before.pid
    address = net_cluster.network.links[1].address
    assert after.worker_address.startswith(f"tcp://{address}:")
    assert net_client.run(socket.gethostname, workers=[after.worker_address]) == {
        after.worker_address: "node-1"
    }
    assert _on(net_client, after, _read, path) == "before"


# -- clusters of their own ------------------------------------------------------------


@pytest.mark.slow
@needs_network
def test_leftovers_of_a_dead_cluster_go_and_close_leaves_nothing(net_cluster, caplog):
    # A "dead" cluster's network, made by hand: a process that has exited owned it.
    exited = subprocess.Popen(["true"])
    exited.wait()
    dead = f"dckpt{exited.pid}a"
    assert not alive(exited.pid)
    made = []
    try:
        for command in (["netns", "add", f"{dead}0"],
                        ["link", "add", f"{dead}br", "type", "bridge"],
                        ["link", "add", f"{dead}0", "type", "veth", "peer", "name", "eth0",
                         "netns", f"{dead}0"]):
            subprocess.run(["ip", *command], check=True, capture_output=True)
            made.append(command)
        assert sorted(_names(dead)) == sorted([f"{dead}0", f"{dead}0", f"{dead}br"])
        live = sorted(_names(net_cluster.network.tag))

        cluster = NodeCluster(1, isolate=True, network=True)
        try:
            assert _names(dead) == []
            assert sorted(_names(net_cluster.network.tag)) == live  # a live one's stay
            assert cluster.network.tag != net_cluster.network.tag
            assert not cluster.network.subnet.overlaps(net_cluster.network.subnet)
            tag = cluster.network.tag
            assert sorted(_names(tag)) == sorted([f"{tag}0", f"{tag}0", f"{tag}br"])
        finally:
            with caplog.at_level(logging.WARNING, logger="dckpt.cluster._netns"):
                cluster.close()
        assert _names(tag) == []
        # Not even a warning: a veth the kernel removed meanwhile is no failure.
        assert [r.getMessage() for r in caplog.records if r.name == "dckpt.cluster._netns"] == []
    finally:
        subprocess.run(["ip", "netns", "del", f"{dead}0"], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", f"{dead}br"], check=False, capture_output=True)


@needs_network
def test_a_network_made_and_removed_leaves_nothing_and_warns_nothing(caplog):
    # No cluster: _netns alone. Deleting a namespace makes the kernel remove its veth
    # pair in the background, racing the explicit removal of the host-side veths;
    # several rounds of three nodes make that race near certain.
    with caplog.at_level(logging.WARNING, logger="dckpt.cluster._netns"):
        for _ in range(3):
            network = _netns.create(3, 10**8)
            try:
                assert len(_names(network.tag)) == 3 + 3 + 1  # namespaces, veths, bridge
            finally:
                _netns.remove(network)
            assert _names(network.tag) == []
    assert [r.getMessage() for r in caplog.records if r.name == "dckpt.cluster._netns"] == []


def _force_unavailable(monkeypatch: pytest.MonkeyPatch, netns: str, tbf: str) -> None:
    monkeypatch.setattr(_netns, "probe", lambda: (netns, tbf))


def test_network_true_where_refused_raises_before_starting_anything(monkeypatch):
    before = child_pids()
    _force_unavailable(monkeypatch, "forced by the test", "no namespaces")
    with pytest.raises(IsolationUnavailableError,
                       match=r"network=True\) needs network namespaces.*forced by the test"
                             r".*network=None"):
        NodeCluster(1, network=True)
    _force_unavailable(monkeypatch, "", "no tbf, forced")
    with pytest.raises(IsolationUnavailableError, match=r"link_rate='1gbit'.*no tbf, forced"):
        NodeCluster(1, network=True, link_rate="1gbit")
    assert child_pids() == before


@pytest.mark.slow
@pytest.mark.skipif(not isolation_available(), reason="node isolation is not available here")
def test_network_none_where_refused_falls_back_to_mount_isolation(monkeypatch):
    _force_unavailable(monkeypatch, "forced by the test", "no namespaces")
    with pytest.warns(NetworkIsolationUnavailableWarning,
                      match=r"forced by the test.*127\.0\.0\.1.*link_rate='1gbit' is not"):
        cluster = NodeCluster(1, isolate=True, network=None, link_rate="1gbit")
    with cluster, cluster.client(set_as_default=False) as client:
        assert cluster.network is None and cluster.isolated
        assert cluster.nodes[0].worker_address.startswith("tcp://127.0.0.1:")
        assert client.run(dckpt._node.node_id) == {cluster.nodes[0].worker_address: "node-0"}


@pytest.mark.parametrize("rate, error, match", [
    ("fast", ValueError, "is not a rate"), ("10mbps", ValueError, "is not a rate"),
    ("1 kbit", ValueError, "too low"), (0, ValueError, "too low"),
    (True, TypeError, "expected text"), (1.5e9, TypeError, "expected text"),
])
def test_malformed_link_rate(rate, error, match):
    with pytest.raises(error, match=match):
        NodeCluster(1, network=True, link_rate=rate)


def test_link_rate_and_node_count_checks():
    before = child_pids()
    with pytest.raises(ValueError, match=r"link_rate='1gbit'\) .*needs network=True"):
        NodeCluster(1, link_rate="1gbit")
    with pytest.raises(ValueError, match="at most 100 node namespaces"):
        NodeCluster(101, network=True)
    assert child_pids() == before
    assert _netns.parse_rate("1gbit") == _netns.parse_rate("1000Mbit") == 10**9
    assert _netns.parse_rate("2.5mbit") == 2_500_000
