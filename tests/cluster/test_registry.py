"""The scheduler's registry of who holds which checkpoint, and the preloads that set
a cluster up.

Workers report snapshots every ``dckpt.registry.interval`` (1 s by default), so the
tests poll with a bounded wait rather than sleep.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from distributed import Client

from dckpt.cluster import NodeCluster, install, registry, who_has
from dckpt.cluster._store import NodeStore, local_store, store_of
from tests._nodes import alive, cluster_pids
from tests._waiting import eventually
from tests.cluster.test_store import _write_checkpoint

pytestmark = pytest.mark.slow

SCHEDULER_DIR = Path(__file__).resolve().parents[2] / "scheduler"
SCHEDULER_PRELOAD = str(SCHEDULER_DIR / "dckpt_scheduler_preload.py")
WORKER_PRELOAD = str(SCHEDULER_DIR / "dckpt_worker_preload.py")
# A snapshot is sent within one interval (1 s) of a change; its age stays far below this.
WAIT = 20.0
# What _write_checkpoint(1, ...) writes: 1 MiB of weights and 13,000 bytes of config.
SIZE = (1 << 20) + 13_000


def write(client: Client, address: str, seed: int) -> tuple[str, str]:
    """A 1 MiB checkpoint registered on the worker at ``address``: its id and digest."""
    _, _, checkpoint_id, digest = client.submit(
        _write_checkpoint, 1, seed, workers=[address], pure=False
    ).result()
    return checkpoint_id, digest


def holders(client: Client, checkpoint_id: str) -> dict[str, list[str]]:
    return who_has(client, [checkpoint_id])[checkpoint_id]


def _store_identity(dask_worker: Any) -> tuple[str, int]:
    store = local_store(dask_worker)
    assert isinstance(store, NodeStore)
    return store.node_id, id(store)


def _plugins(dask_scheduler: Any) -> tuple[list[str], list[str], list[str]]:
    return (
        sorted(dask_scheduler.plugins),
        sorted(dask_scheduler.worker_plugins),
        sorted(h for h in dask_scheduler.handlers if h.startswith("dckpt")),
    )


def _workers_to_close(dask_scheduler: Any) -> list[str]:
    return sorted(dask_scheduler.workers_to_close(n=len(dask_scheduler.workers)))


# ------------------------------------------------------- on the shared isolated cluster


def test_who_has_shows_the_origin_then_the_nodes_that_cached_it(node_client: Client, nodes):
    owner, receiver = nodes
    checkpoint_id, digest = write(node_client, owner, seed=21)
    places = eventually(lambda: holders(node_client, checkpoint_id),
                        lambda p: bool(p["origin"]), "origin in who_has")
    assert places == {"origin": [owner], "cached": []}

    store_of(receiver, node_client).fetch(owner, checkpoint_id, digest).result()
    places = eventually(lambda: holders(node_client, checkpoint_id),
                        lambda p: bool(p["cached"]), "cached copy in who_has")
    assert places == {"origin": [owner], "cached": [receiver]}

    # Every id asked for is answered, held or not.
    assert who_has(node_client, ["no-such-checkpoint", checkpoint_id])["no-such-checkpoint"] == {
        "origin": [], "cached": []
    }


def test_registry_lists_each_workers_holdings_with_sizes(node_client: Client, nodes):
    owner, receiver = nodes
    checkpoint_id, digest = write(node_client, owner, seed=22)
    store_of(receiver, node_client).fetch(owner, checkpoint_id, digest).result()
    everything = eventually(
        lambda: registry(node_client),
        lambda r: checkpoint_id in r[owner]["origin"] and checkpoint_id in r[receiver]["cached"],
        "origin and cached copy",
    )
    assert set(everything) == {owner, receiver}
    assert everything[owner]["node_id"] == "node-0"
    assert everything[receiver]["node_id"] == "node-1"
    assert everything[owner]["origin"][checkpoint_id] == SIZE
    assert everything[receiver]["cached"][checkpoint_id] == SIZE
    assert checkpoint_id not in everything[owner]["cached"]
    assert checkpoint_id not in everything[receiver]["origin"]
    assert all(0 <= w["age"] < WAIT for w in everything.values())


def test_install_is_idempotent_and_keeps_the_stores(node_client: Client, nodes):
    owner, _ = nodes
    checkpoint_id, digest = write(node_client, owner, seed=23)
    before = node_client.run(_store_identity)
    install(node_client)
    install(node_client)
    assert node_client.run(_store_identity) == before  # the same store objects
    plugins, worker_plugins, handlers = node_client.run_on_scheduler(_plugins)
    assert plugins.count("dckpt") == 1 and worker_plugins.count("dckpt") == 1
    assert handlers == ["dckpt_checkpoints", "dckpt_holders", "dckpt_holdings", "dckpt_registry",
                        "dckpt_who_has"]
    # What was registered before is still served, and still in the registry.
    assert store_of(owner, node_client).manifest(checkpoint_id).result()["digest"] == digest
    assert eventually(lambda: holders(node_client, checkpoint_id)["origin"], bool,
                      "origin in who_has") == [owner]


# ------------------------------------------- a small cluster set up by the preload alone


@pytest.fixture(scope="module")
def preloaded() -> Iterator[NodeCluster]:
    """Two nodes whose scheduler got dckpt only through the scheduler preload.

    Not isolated: nothing here depends on separate disks, and this cluster is killed
    and restarted freely without touching the shared one.
    """
    cluster = NodeCluster(
        2, isolate=False, env={"DASK_DISTRIBUTED__SCHEDULER__PRELOAD": SCHEDULER_PRELOAD}
    )
    try:
        yield cluster
    finally:
        pids, root = cluster_pids(cluster), cluster.root
        cluster.close()
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(root)


@pytest.fixture(scope="module")
def preloaded_client(preloaded: NodeCluster) -> Client:
    return preloaded.client(set_as_default=False)


def test_the_scheduler_preload_sets_up_the_whole_cluster(preloaded: NodeCluster,
                                                         preloaded_client: Client):
    client = preloaded_client  # no install() anywhere in this module's cluster
    stores = client.run(_store_identity)
    assert {address: node_id for address, (node_id, _) in stores.items()} == {
        n.worker_address: n.node_id for n in preloaded.nodes
    }
    plugins, worker_plugins, handlers = client.run_on_scheduler(_plugins)
    assert "dckpt" in plugins and "dckpt" in worker_plugins and len(handlers) == 5
    # Every worker reports, even with nothing to hold.
    everything = eventually(lambda: registry(client),
                            lambda r: all(w["node_id"] for w in r.values()), "reports")
    assert {a: w["node_id"] for a, w in everything.items()} == {
        n.worker_address: n.node_id for n in preloaded.nodes
    }


def test_scale_down_keeps_the_last_holder_of_a_checkpoint(preloaded: NodeCluster,
                                                          preloaded_client: Client):
    client = preloaded_client
    first, second = (n.worker_address for n in preloaded.nodes)
    assert client.run_on_scheduler(_workers_to_close) == sorted([first, second])

    checkpoint_id, digest = write(client, first, seed=31)
    eventually(lambda: holders(client, checkpoint_id)["origin"], bool, "origin")
    assert client.run_on_scheduler(_workers_to_close) == [second]

    # With a copy on the second node either may go, but not both.
    store_of(second, client).fetch(first, checkpoint_id, digest).result()
    eventually(lambda: holders(client, checkpoint_id)["cached"], bool, "cached copy")
    assert len(client.run_on_scheduler(_workers_to_close)) == 1


def test_a_dead_workers_holdings_are_dropped_at_once(preloaded: NodeCluster,
                                                     preloaded_client: Client):
    client = preloaded_client
    first, second = (n.worker_address for n in preloaded.nodes)
    checkpoint_id, digest = write(client, first, seed=32)
    store_of(second, client).fetch(first, checkpoint_id, digest).result()
    eventually(lambda: holders(client, checkpoint_id),
               lambda p: bool(p["origin"] and p["cached"]), "origin and cached copy")

    preloaded.kill_node(1)  # returns once the scheduler has removed the worker
    assert holders(client, checkpoint_id) == {"origin": [first], "cached": []}
    assert set(registry(client)) == {first}
    # A snapshot that arrives late, from the dead worker, does not bring it back.
    late = client.sync(client.scheduler.dckpt_holdings, address=second, node_id="node-1",
                       holdings={"origin": {}, "cached": {checkpoint_id: SIZE}})
    assert late == {"status": "unknown-worker"}
    assert set(registry(client)) == {first}

    # The node comes back with its cache on disk, and reports it without being asked.
    restarted = preloaded.restart_node(1).worker_address
    places = eventually(lambda: holders(client, checkpoint_id),
                        lambda p: bool(p["cached"]), "restarted node's cache")
    assert places == {"origin": [first], "cached": [restarted]}


# --------------------------------------------------- workers preloaded, scheduler not


def test_the_worker_preload_gives_stores_and_install_adds_the_registry_later():
    cluster = NodeCluster(
        1, isolate=False, env={"DASK_DISTRIBUTED__WORKER__PRELOAD": WORKER_PRELOAD}
    )
    pids, root = cluster_pids(cluster), cluster.root
    with cluster:
        client = cluster.client(set_as_default=False)
        (address,) = (n.worker_address for n in cluster.nodes)
        node_id, store = client.run(_store_identity)[address]
        assert node_id == "node-0"
        checkpoint_id, _ = write(client, address, seed=41)
        with pytest.raises(RuntimeError, match="scheduler has no dckpt plugin.*install"):
            who_has(client, [checkpoint_id])

        install(client)  # re-adds the worker plugin: the same store, now reporting
        assert tuple(client.run(_store_identity)[address]) == (node_id, store)
        assert eventually(lambda: holders(client, checkpoint_id)["origin"], bool,
                          "origin after install") == [address]
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(root)


# ------------------------------------------------------------------------ the config


def test_the_example_config_names_real_settings_with_their_defaults():
    import dask.config

    text = (SCHEDULER_DIR / "config.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["distributed"]["scheduler"]["preload"][0].endswith(
        "scheduler/dckpt_scheduler_preload.py"
    )
    lines = text.splitlines()
    start = lines.index("# dckpt:")
    example = yaml.safe_load("\n".join(line[2:] for line in lines[start:] if line.startswith("# ")))

    def leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value
        return out

    shown = leaves(example)
    assert "dckpt.registry.interval" in shown
    for key, value in shown.items():
        assert dask.config.get(key) == value, key
