"""NodeStore on an isolated NodeCluster: serving, cross-node copies, single flight.

The nodes do not share a disk (each worker runs in its own mount namespace), so these
tests cannot pass by reading another node's files through the filesystem.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from distributed import Client

from dckpt.cluster import NodeCluster, _stream, stats
from dckpt.cluster._store import local_store, register_directory, store_of
from tests._damage import chunks_damaged_in_transit

pytestmark = pytest.mark.slow


def _write_checkpoint(size_mib: int, seed: int) -> tuple[str, dict[str, str], str, str]:
    """On a worker: write a checkpoint under the node root, register it.

    Returns its path, the sha256 of each file, its id and its digest.
    """
    import random

    from dckpt import _node

    rng = random.Random(f"test_store-{seed}")
    path = os.path.join(_node.node_root(), f"ckpt-{uuid.uuid4().hex[:8]}")
    os.makedirs(os.path.join(path, "sub"))
    os.makedirs(os.path.join(path, "empty"))
    files = {
        "weights.bin": rng.randbytes(size_mib << 20),
        # 13,000 bytes, unique: ids are of content, and each call is a new checkpoint.
        "sub/config.json": (uuid.uuid4().hex.encode() + b'{"layers": 3}' * 1000)[:13_000],
        "empty.txt": b"",
    }
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    registration = register_directory(path)
    return path, _hashes(path), registration.checkpoint_id, registration.manifest.digest


def _hashes(path: str) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), path) + "/"] = ""
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _stats() -> dict:
    return local_store().stats()


def test_a_checkpoint_moves_to_another_node_once(node_client: Client, nodes):
    owner, receiver = nodes
    path, hashes, checkpoint_id, digest = node_client.submit(
        _write_checkpoint, 3, 1, workers=[owner], pure=False
    ).result()
    # The nodes share no disk: node 1 cannot see node 0's checkpoint, nor can the driver.
    assert node_client.submit(_exists, path, workers=[receiver], pure=False).result() is False
    assert not os.path.exists(path)
    before = node_client.submit(_stats, workers=[receiver], pure=False).result()

    cached = store_of(receiver, node_client).fetch(owner, checkpoint_id, digest).result()
    assert node_client.submit(_hashes, cached, workers=[receiver], pure=False).result() == hashes

    again = store_of(receiver, node_client).fetch(owner, checkpoint_id, digest).result()
    assert again == cached
    after = node_client.submit(_stats, workers=[receiver], pure=False).result()
    assert after["transfers"] - before["transfers"] == 1
    assert after["bytes_received"] - before["bytes_received"] == (3 << 20) + 13_000
    assert after["cache_hits"] - before["cache_hits"] == 1


def test_concurrent_fetches_make_one_transfer(node_client: Client, nodes):
    owner, receiver = nodes
    _, hashes, checkpoint_id, digest = node_client.submit(
        _write_checkpoint, 2, 2, workers=[owner], pure=False
    ).result()
    before = node_client.submit(_stats, workers=[receiver], pure=False).result()
    proxy = store_of(receiver, node_client)
    futures = [proxy.fetch(owner, checkpoint_id, digest) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda f: f.result(), futures))
    assert len(set(paths)) == 1
    after = node_client.submit(_stats, workers=[receiver], pure=False).result()
    assert after["transfers"] - before["transfers"] == 1
    assert node_client.submit(_hashes, paths[0], workers=[receiver], pure=False).result() == hashes


def test_a_chunk_damaged_in_transit_is_detected_and_fetched_again(node_client: Client, nodes):
    owner, receiver = nodes
    _, hashes, checkpoint_id, digest = node_client.submit(
        _write_checkpoint, 1, 5, workers=[owner], pure=False
    ).result()
    manifest = store_of(owner, node_client).manifest(checkpoint_id).result()
    n_chunks = sum(1 for _, size, _, _ in manifest["files"] if size)  # all under one chunk
    sent_before = node_client.submit(_stats, workers=[owner], pure=False).result()["chunks_sent"]
    with chunks_damaged_in_transit(node_client, owner, 2):
        cached = store_of(receiver, node_client).fetch(owner, checkpoint_id, digest).result()
    assert node_client.submit(_hashes, cached, workers=[receiver], pure=False).result() == hashes
    sent = node_client.submit(_stats, workers=[owner], pure=False).result()["chunks_sent"]
    assert sent - sent_before == n_chunks + 2  # the two damaged chunks were sent again


def test_a_store_serves_only_registered_checkpoints(node_client: Client, nodes):
    owner, _ = nodes
    for name in ("/etc/passwd", "../../etc", uuid.uuid4().hex):
        with pytest.raises(PermissionError, match="not registered"):
            store_of(owner, node_client).manifest(name).result()
        with pytest.raises(PermissionError, match="not registered"):
            node_client.sync(_pull_into, node_client, owner, name, "0" * 64, "/nonexistent")


async def _pull_into(client: Client, address: str, checkpoint_id: str, digest: str,
                     target: str) -> None:
    async with _stream.pulling(client.rpc, address, checkpoint_id, digest) as pull:
        await pull.receive_into(target)


def test_stats_are_read_per_worker_from_the_client(node_cluster: NodeCluster,
                                                   node_client: Client, nodes):
    owner, receiver = nodes
    before = stats(node_client)
    assert set(before) == {n.worker_address for n in node_cluster.nodes}
    assert {s["node_id"] for s in before.values()} == {"node-0", "node-1"}
    _, _, checkpoint_id, digest = node_client.submit(
        _write_checkpoint, 2, 6, workers=[owner], pure=False
    ).result()
    store_of(receiver, node_client).fetch(owner, checkpoint_id, digest).result()
    after = stats(node_client)
    size = (2 << 20) + 13_000
    assert after[owner]["bytes_sent"] - before[owner]["bytes_sent"] == size
    assert after[receiver]["bytes_received"] - before[receiver]["bytes_received"] == size
    assert after[receiver]["transfers"] - before[receiver]["transfers"] == 1


def test_a_restarted_worker_finds_its_cache_again(node_cluster: NodeCluster,
                                                  node_client: Client, nodes):
    # It restarts node 1: the `nodes` fixture gives later tests its new address.
    owner, receiver = nodes
    _, hashes, checkpoint_id, digest = node_client.submit(
        _write_checkpoint, 1, 4, workers=[owner], pure=False
    ).result()
    cached = store_of(receiver, node_client).fetch(owner, checkpoint_id, digest).result()
    restarted = node_cluster.restart_node(1).worker_address
    fresh = node_client.submit(_stats, workers=[restarted], pure=False).result()
    assert fresh["transfers"] == 0 and fresh["cache"]["entries"] >= 1
    assert store_of(restarted, node_client).fetch(owner, checkpoint_id, digest).result() == cached
    after = node_client.submit(_stats, workers=[restarted], pure=False).result()
    assert (after["transfers"], after["cache_hits"]) == (0, 1)
    assert node_client.submit(_hashes, cached, workers=[restarted], pure=False).result() == hashes
