"""Node references on an isolated NodeCluster: a directory checkpoint pickled on a
worker travels as a reference and its bytes move only to the nodes that use it."""

from __future__ import annotations

import os
import pickle
import random
import signal

import pytest
from distributed import Client

from dckpt import CacheFullError, Checkpoint, CheckpointUnavailableError
from dckpt.cluster import NodeCluster, stats

pytestmark = pytest.mark.slow

SIZE = 2 << 20


def _make_checkpoint(seed: int, persist_to: str | None = None) -> Checkpoint:
    """On a worker: a directory checkpoint under this node's root."""
    from dckpt import _node

    path = os.path.join(_node.node_root(), f"model-{seed}")
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(random.Random(f"test_references-{seed}").randbytes(SIZE))
    checkpoint = Checkpoint.from_directory(path)
    checkpoint.set_metadata({"seed": seed})
    if persist_to is not None:
        checkpoint.to_uri(persist_to)
    return checkpoint


def _use(checkpoint: Checkpoint, connect_timeout: str = "10s") -> tuple[str, bytes, dict]:
    """On a worker: read the data as a user would."""
    import dask.config

    with dask.config.set({"dckpt.transfer.connect-timeout": connect_timeout}), \
            checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "weights.bin"), "rb") as f:
            return directory, f.read(), checkpoint.get_metadata()


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _received(client: Client, address: str) -> tuple[int, int]:
    s = stats(client)[address]
    return s["transfers"], s["bytes_received"]


def test_a_checkpoint_returned_by_a_task_is_a_small_reference(node_client, nodes):
    owner, _ = nodes
    checkpoint = node_client.submit(_make_checkpoint, 1, workers=[owner], pure=False).result()
    kind, ref = checkpoint.get_internal_representation()
    assert kind == "node_ref" and ref.node_id == "node-0"
    assert len(pickle.dumps(checkpoint)) < 2048
    assert not os.path.exists(ref.path)  # the driver cannot see node 0's disk
    assert checkpoint.get_metadata() == {"seed": 1}  # metadata travels without the data


def test_used_on_another_node_it_moves_once_and_only_there(node_client, nodes):
    owner, receiver = nodes
    checkpoint = node_client.submit(_make_checkpoint, 2, workers=[owner], pure=False).result()
    ref = checkpoint.get_internal_representation()[1]
    assert node_client.submit(_exists, ref.path, workers=[receiver], pure=False).result() is False
    expected = random.Random("test_references-2").randbytes(SIZE)
    before = _received(node_client, receiver)

    where, data, metadata = node_client.submit(_use, checkpoint, workers=[receiver], pure=False).result()
    assert data == expected and metadata == {"seed": 2}
    assert where != ref.path
    first = _received(node_client, receiver)
    assert first[0] - before[0] == 1 and first[1] - before[1] == SIZE

    again = node_client.submit(_use, checkpoint, workers=[receiver], pure=False).result()
    assert again[1] == expected
    assert _received(node_client, receiver) == first  # a second use moves nothing

    owner_before = _received(node_client, owner)
    on_owner = node_client.submit(_use, checkpoint, workers=[owner], pure=False).result()
    assert on_owner[0] == ref.path and on_owner[1] == expected  # used in place
    assert _received(node_client, owner) == owner_before


def _evict_while_in_use_and_after(checkpoint: Checkpoint) -> dict[str, object]:
    """On a worker of another node: try to evict the cached copy while the checkpoint
    is in use, then after; then use it again."""
    from dckpt.cluster._store import local_store

    cache = local_store()._cache
    checkpoint_id = checkpoint.get_internal_representation()[1].checkpoint_id
    with checkpoint.as_directory() as directory:
        evicted_in_use = cache.evict(checkpoint_id)
        still_there = os.path.isdir(directory)
    evicted_after = cache.evict(checkpoint_id)
    gone_after = not os.path.isdir(directory)
    with checkpoint.as_directory() as again, open(os.path.join(again, "weights.bin"), "rb") as f:
        data = f.read()
    return {"evicted_in_use": evicted_in_use, "still_there": still_there,
            "evicted_after": evicted_after, "gone_after": gone_after, "data": data}


def test_a_copy_in_use_is_pinned_and_an_evicted_one_fetched_again(node_client, nodes):
    owner, receiver = nodes
    checkpoint = node_client.submit(_make_checkpoint, 6, workers=[owner], pure=False).result()
    before = _received(node_client, receiver)
    seen = node_client.submit(
        _evict_while_in_use_and_after, checkpoint, workers=[receiver], pure=False
    ).result()
    assert seen["evicted_in_use"] is False and seen["still_there"] is True
    assert seen["evicted_after"] is True and seen["gone_after"] is True
    assert seen["data"] == random.Random("test_references-6").randbytes(SIZE)
    after = _received(node_client, receiver)
    assert after[0] - before[0] == 2  # fetched, evicted, fetched again on the next use


def test_the_driver_can_read_it_too(node_client, nodes, tmp_path):
    import dask.config

    owner, _ = nodes
    checkpoint = node_client.submit(_make_checkpoint, 3, workers=[owner], pure=False).result()
    with dask.config.set({"dckpt.temporary-directory": str(tmp_path)}), node_client.as_current():
        out = checkpoint.to_directory(tmp_path / "out")
    with open(os.path.join(out, "weights.bin"), "rb") as f:
        assert f.read() == random.Random("test_references-3").randbytes(SIZE)


def test_when_the_owner_dies_a_uri_saves_the_day_and_otherwise_the_error_says_why(
    node_cluster: NodeCluster, node_client: Client, nodes, tmp_path
):
    owner, receiver = nodes
    persisted = node_client.submit(
        _make_checkpoint, 4, f"file://{tmp_path}/persisted", workers=[owner], pure=False
    ).result()
    lost = node_client.submit(_make_checkpoint, 5, workers=[owner], pure=False).result()
    assert persisted.get_internal_representation()[1].uris
    node_cluster.kill_node(0)
    try:
        _, data, _ = node_client.submit(
            _use, persisted, "2s", workers=[receiver], pure=False
        ).result()
        assert data == random.Random("test_references-4").randbytes(SIZE)
        with pytest.raises(CheckpointUnavailableError, match=r"(?s)node node-0.*Tried:.*store of node-0"):
            node_client.submit(_use, lost, "2s", workers=[receiver], pure=False).result()
    finally:
        node_cluster.restart_node(0)


def _use_with_a_cache_of(checkpoint: Checkpoint, max_bytes: int) -> tuple[str, bytes, dict]:
    """On a worker: :func:`_use` with this node's cache budget set to ``max_bytes``."""
    import dask.config

    with dask.config.set({"dckpt.cache.max-bytes": max_bytes}):
        return _use(checkpoint)


def _cached_ids() -> list[str]:
    from dckpt.cluster._store import local_store

    return [e.checkpoint_id for e in local_store()._cache.entries()]


def _current(node_cluster: NodeCluster) -> tuple[str, str]:
    """Node 0's and node 1's workers now (``nodes`` goes stale once a test restarts one)."""
    return node_cluster.nodes[0].worker_address, node_cluster.nodes[1].worker_address


def test_a_checkpoint_larger_than_this_nodes_cache_is_blamed_on_this_node(
    node_cluster: NodeCluster, node_client: Client, nodes, tmp_path
):
    """No other holder or URI can fix a cache too small: CacheFullError about the
    reading node, raised at once, not CheckpointUnavailableError about the owner."""
    owner, receiver = _current(node_cluster)
    checkpoint = node_client.submit(
        _make_checkpoint, 7, f"file://{tmp_path}/persisted-7", workers=[owner], pure=False
    ).result()
    ref = checkpoint.get_internal_representation()[1]
    before = _received(node_client, receiver)
    with pytest.raises(CacheFullError) as info:
        node_client.submit(_use_with_a_cache_of, checkpoint, SIZE // 2, workers=[receiver],
                           pure=False).result()
    assert not isinstance(info.value, CheckpointUnavailableError)
    message = str(info.value)
    assert message.startswith(f"node node-1 copying checkpoint {ref.checkpoint_id} of node node-0")
    assert "larger than the whole node cache" in message and "dckpt.cache.max-bytes" in message
    assert _received(node_client, receiver) == before  # nothing moved, not even from the URI
    assert ref.checkpoint_id not in node_client.submit(_cached_ids, workers=[receiver],
                                                       pure=False).result()


def test_a_store_that_does_not_answer_is_named_with_the_timeout(
    node_cluster: NodeCluster, node_client: Client, nodes
):
    owner, receiver = _current(node_cluster)
    checkpoint = node_client.submit(_make_checkpoint, 8, workers=[owner], pure=False).result()
    pid = node_cluster.nodes[0].pid
    os.kill(pid, signal.SIGSTOP)  # alive, listening, answering nothing
    try:
        with pytest.raises(CheckpointUnavailableError) as info:
            node_client.submit(_use, checkpoint, "1s", workers=[receiver], pure=False).result()
    finally:
        os.kill(pid, signal.SIGCONT)
    message = str(info.value)
    assert f"TimeoutError: the store of node node-0 at {owner} did not answer within 1 s " \
        "while " in message, message
    assert "(dckpt.transfer.connect-timeout, DASK_DCKPT__TRANSFER__CONNECT_TIMEOUT)" in message
    # The owner works again.
    expected = random.Random("test_references-8").randbytes(SIZE)
    assert node_client.submit(_use, checkpoint, workers=[receiver],
                              pure=False).result()[1] == expected


def test_the_drivers_copies_go_when_its_process_ends(tmp_path):
    """Copies a driver made (``dckpt-fetched/<pid>``) are removed at its exit, and a
    dead process's folder by the next process that makes its own; a live one's stays."""
    import subprocess
    import sys

    base = tmp_path / "dckpt-fetched"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (base / dead / "old-copy").mkdir(parents=True)
    live = base / str(os.getppid())  # pytest's parent: alive for as long as this runs
    live.mkdir()
    script = (
        "from dckpt.cluster._store import driver_store\n"
        "print(driver_store().stats()['cache']['root'])\n"
    )
    env = {**os.environ, "DASK_DCKPT__TEMPORARY_DIRECTORY": str(tmp_path)}
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env=env).stdout.strip()
    assert os.path.dirname(os.path.dirname(made)) == str(base)  # <base>/<pid>/cache
    assert not os.path.exists(made)  # removed when that process exited
    assert sorted(os.listdir(base)) == [live.name]  # the dead one's folder went too
