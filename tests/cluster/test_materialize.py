"""One materialization path: every request goes through a store, counted once.

On the isolated NodeCluster (no shared disk): a worker's store and the driver's
server-less store run the same code (``NodeStore.materialize``), and a request that is
not usable in place counts as one cache hit or one cache miss.
"""

from __future__ import annotations

import os
import pickle
import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from distributed import Client
from fsspec.callbacks import Callback

from dckpt import Checkpoint
from dckpt.cluster import stats
from dckpt.cluster._store import driver_store, store_of

pytestmark = pytest.mark.slow

SIZE = 1 << 20


def _make_checkpoint(seed: int) -> Checkpoint:
    """On a worker: a directory checkpoint of its own under this node's root."""
    from dckpt import _node

    path = os.path.join(_node.node_root(), f"materialize-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(random.Random(f"test_materialize-{seed}").randbytes(SIZE))
    return Checkpoint.from_directory(path)


def _counters(client: Client, address: str) -> dict[str, int]:
    s = stats(client)[address]
    return {name: s[name] for name in ("transfers", "cache_hits", "cache_misses")}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after}


def test_each_request_counts_once_one_miss_and_the_rest_hits(node_client: Client, nodes):
    owner, receiver = nodes
    checkpoint = node_client.submit(_make_checkpoint, 1, workers=[owner], pure=False).result()
    _, ref = checkpoint.get_internal_representation()
    before = _counters(node_client, receiver)
    proxy = store_of(receiver, node_client)
    futures = [proxy.materialize(ref) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(lambda f: f.result(), futures))
    assert len(paths) == 1
    assert _delta(_counters(node_client, receiver), before) == {
        "transfers": 1, "cache_misses": 1, "cache_hits": 7}
    # The cache keeps no hit or miss counts of its own to disagree with.
    assert not {"hits", "misses"} & set(stats(node_client)[receiver]["cache"])


def test_the_driver_materializes_through_a_store_of_its_own(node_client: Client, nodes):
    owner, _ = nodes
    checkpoint = node_client.submit(_make_checkpoint, 2, workers=[owner], pure=False).result()
    _, ref = checkpoint.get_internal_representation()
    store = driver_store()
    before = store.stats()
    expected = random.Random("test_materialize-2").randbytes(SIZE)

    def read(copy: Checkpoint) -> tuple[str, bytes]:
        # The driver's store reaches the holders through the current client.
        with node_client.as_current(), copy.as_directory() as directory:
            with open(os.path.join(directory, "weights.bin"), "rb") as f:
                return directory, f.read()

    # Two objects of one reference, read at once by two threads: one transfer.
    copies = [pickle.loads(pickle.dumps(checkpoint)) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(read, copies))
    assert {data for _, data in results} == {expected}
    [directory] = {where for where, _ in results}
    assert directory != ref.path and directory.startswith(store.stats()["cache"]["root"])
    after = store.stats()
    assert (after["transfers"] - before["transfers"],
            after["cache_misses"] - before["cache_misses"],
            after["cache_hits"] - before["cache_hits"]) == (1, 1, 1)

    # A copy evicted since its last use is fetched again, as on a node.
    assert store.evict(ref.checkpoint_id)
    assert read(copies[0])[1] == expected
    assert store.stats()["transfers"] - after["transfers"] == 1


class _Recording(Callback):  # type: ignore[misc]
    """An fsspec callback that keeps what it and its branched children are told."""

    def __init__(self) -> None:
        super().__init__()
        self.children: list[tuple[str, str, _Recording]] = []
        self.sizes: list[int] = []
        self.received = 0

    def set_size(self, size: int) -> None:
        self.sizes.append(size)

    def relative_update(self, inc: int = 1) -> None:
        self.received += inc

    def branched(self, path_1: str, path_2: str, **kwargs: object) -> _Recording:
        child = _Recording()
        self.children.append((path_1, path_2, child))
        return child


def test_a_fetch_from_another_node_reports_its_bytes_to_the_callback(
    node_client: Client, nodes, tmp_path
):
    owner, _ = nodes
    checkpoint = node_client.submit(_make_checkpoint, 3, workers=[owner], pure=False).result()
    _, ref = checkpoint.get_internal_representation()
    progress = _Recording()
    with node_client.as_current():
        out = checkpoint.to_directory(str(tmp_path / "out"), callback=progress)
    with open(os.path.join(out, "weights.bin"), "rb") as f:
        assert f.read() == random.Random("test_materialize-3").randbytes(SIZE)
    fetches = [child for source, _, child in progress.children if source == repr(ref)]
    assert len(fetches) == 1
    assert fetches[0].sizes == [ref.size] and fetches[0].received == ref.size
    # Then the local copy, one update per file, as without a fetch.
    assert progress.sizes == [1] and progress.received == 1
