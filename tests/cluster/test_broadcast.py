"""Broadcast: many nodes reading one checkpoint at once form a chain, not a fan-out.

An isolated four-node NodeCluster of its own (kills stay in this module), chunks of
1 MiB so that a 16 MiB checkpoint is many chunks and a chain can overlap them.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import uuid
from collections.abc import Iterator

import pytest
from distributed import Client

import dckpt
from dckpt import Checkpoint
from dckpt._transfer import ChunkSpec, build_manifest
from dckpt.cluster import (
    NodeCluster,
    network_isolation_available,
    stats,
)
from dckpt.cluster._broadcast import Fetchers
from dckpt.cluster._relay import Relay
from dckpt.cluster._store import store_of
from tests._nodes import installed_client, isolated_cluster
from tests._waiting import eventually

SIZE = 16 << 20
CHUNK = 1 << 20


# -- the scheduler's choice and the relay's bookkeeping, in process --------------------


def test_simultaneous_readers_are_chained_one_behind_the_other():
    fetchers = Fetchers()
    cid = "c" * 32
    assert fetchers.ask(cid, "tcp://r1", "node-1") == []
    [second] = fetchers.ask(cid, "tcp://r2", "node-2")
    [third] = fetchers.ask(cid, "tcp://r3", "node-3")
    assert (second["address"], third["address"]) == ("tcp://r1", "tcp://r2")
    assert second["kind"] == third["kind"] == "fetching"
    # A reader of a node that already fetches is never sent to itself.
    assert fetchers.ask(cid, "tcp://r3b", "node-3") == []
    # Finished (now cached) or gone: no longer named.
    fetchers.reported("tcp://r3", held={cid}, fetching=set(), grace=60)
    fetchers.forget_worker("tcp://r3b")
    assert fetchers.ask(cid, None, None) == []


def test_a_relay_hands_out_a_chunk_only_once_all_its_bytes_are_written(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(b"x" * 300)
    relay = Relay(build_manifest(str(tmp_path / "src")), str(tmp_path / "staging"))
    wanted = ChunkSpec(0, 100, 150)
    relay.written(ChunkSpec(0, 0, 120))
    with pytest.raises(TimeoutError):
        relay.wait_for(wanted, timeout=0)
    relay.written(ChunkSpec(0, 200, 100))
    relay.written(ChunkSpec(0, 120, 80))  # closes the gap
    assert relay.wait_for(wanted, timeout=0) == str(tmp_path / "staging")
    relay.moving()  # renamed into the cache now: nobody may open files by the old path
    with pytest.raises(TimeoutError):
        relay.wait_for(wanted, timeout=0)
    relay.moved(str(tmp_path / "final"))
    assert relay.wait_for(ChunkSpec(0, 0, 300), timeout=0) == str(tmp_path / "final")
    relay.fail(OSError("the source went away"))
    with pytest.raises(dckpt.CheckpointError, match="own transfer failed"):
        relay.wait_for(wanted, timeout=0)


# -- on the cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[NodeCluster]:
    env = {"DASK_DCKPT__TRANSFER__CHUNK_BYTES": str(CHUNK)}
    with isolated_cluster(4, network=network_isolation_available(), env=env) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster: NodeCluster) -> Client:
    return installed_client(cluster)


def _make_checkpoint(seed: int) -> Checkpoint:
    """On a worker: a 16 MiB directory checkpoint under this node's root."""
    from dckpt import _node

    path = os.path.join(_node.node_root(), f"broadcast-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(random.Random(seed).randbytes(SIZE))
    return Checkpoint.from_directory(path)


def _sha256(path: str) -> str:
    with open(os.path.join(path, "weights.bin"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _sent(client: Client, address: str) -> int:
    return int(stats(client)[address]["bytes_sent"])


@pytest.mark.slow
def test_a_checkpoint_put_to_every_node_leaves_its_owner_about_once(cluster, client):
    owner = cluster.nodes[0].worker_address
    checkpoint = client.submit(_make_checkpoint, 1, workers=[owner], pure=False).result()
    before = _sent(client, owner)
    staged = dckpt.put(checkpoint, client=client)
    _, ref = staged.get_internal_representation()
    expected = hashlib.sha256(random.Random(1).randbytes(SIZE)).hexdigest()
    for node in cluster.nodes[1:]:
        path = store_of(node.worker_address, client).materialize(ref).result()
        assert client.submit(_sha256, path, workers=[node.worker_address],
                             pure=False).result() == expected
    # Three readers at once: a fan-out would send 3x the size from the owner.
    assert _sent(client, owner) - before <= 1.5 * SIZE


# Installed in the owner's process by the next test: its chunk reads stop after a few
# until released, so that the chain is caught halfway.
def _gate_the_owner(after: int) -> None:
    import dckpt._transfer as transfer_module

    original = transfer_module.ChunkSource
    gate = threading.Event()
    reads = [0]

    class Gated(original):  # type: ignore[misc,valid-type]
        def read_parts(self, spec, buffer=None, **kwargs):
            reads[0] += 1
            if reads[0] > after:
                gate.wait(60)
            return super().read_parts(spec, buffer, **kwargs)

        def read_region(self, spec):  # the chunks sent from the file (os.sendfile)
            reads[0] += 1
            if reads[0] > after:
                gate.wait(60)
            return super().read_region(spec)

    transfer_module.ChunkSource = Gated
    transfer_module._dckpt_test_gate = (original, gate, reads)


def _gate_reads() -> int:
    import dckpt._transfer as transfer_module

    return transfer_module._dckpt_test_gate[2][0]


def _open_the_gate() -> None:
    import dckpt._transfer as transfer_module

    original, gate, _ = transfer_module._dckpt_test_gate
    transfer_module.ChunkSource = original
    gate.set()


def _relaying(dask_worker) -> tuple[list[str], int]:
    from dckpt.cluster._store import local_store

    held = local_store(dask_worker).holdings()
    return held["obtaining"], held["serving"]


@pytest.mark.slow
def test_a_relay_killed_midway_costs_its_readers_a_retry_never_a_wrong_byte(cluster, client):
    owner = cluster.nodes[0].worker_address
    checkpoint = client.submit(_make_checkpoint, 2, workers=[owner], pure=False).result()
    _, ref = checkpoint.get_internal_representation()
    expected = hashlib.sha256(random.Random(2).randbytes(SIZE)).hexdigest()
    client.run(_gate_the_owner, 4, workers=[owner])
    readers = [node.worker_address for node in cluster.nodes[1:]]
    try:
        fetches = {address: store_of(address, client).materialize(ref) for address in readers}
        # Halfway: the owner stopped after a few chunks, and every reader is in the chain.
        eventually(lambda: client.run(_gate_reads, workers=[owner])[owner], lambda n: n > 4,
                   "the owner reaching its gate")
        state = eventually(lambda: client.run(_relaying, workers=readers),
                           lambda s: all(ref.checkpoint_id in f for f, _ in s.values())
                           and any(n > 0 for _, n in s.values()),
                           "every reader fetching, and one relaying")
        relay = next(a for a in readers if state[a][1] > 0)
        cluster.kill_node(readers.index(relay) + 1)
    finally:
        client.run(_open_the_gate, workers=[owner])
    for address in readers:
        if address == relay:
            continue
        path = fetches[address].result()
        assert client.submit(_sha256, path, workers=[address], pure=False).result() == expected
    cluster.restart_node(readers.index(relay) + 1)
