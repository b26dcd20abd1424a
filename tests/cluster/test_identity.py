"""A checkpoint is its content, and every node that holds it can serve it: on an
isolated NodeCluster of three nodes, references keep their identity as they are
forwarded, any holder the registry names serves them, and registrations outlive the
worker process."""

from __future__ import annotations

import os
import random
import signal
import uuid

import pytest
from distributed import Client

from dckpt import Checkpoint, CheckpointUnavailableError
from dckpt.cluster import NodeCluster, checkpoints, stats, who_has
from tests._three_nodes import client, cluster, workers  # noqa: F401 (fixtures)
from tests._waiting import eventually

pytestmark = pytest.mark.slow

SIZE = 1 << 20


# cluster, client, workers: an isolated three-node NodeCluster of this module.


def _content(seed: int) -> bytes:
    return random.Random(seed).randbytes(SIZE)


def _make(data: bytes, name: str | None = None) -> Checkpoint:
    """On a worker: a directory checkpoint of ``data`` under this node's root."""
    from dckpt import _node

    path = os.path.join(_node.node_root(), name or f"model-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(data)
    return Checkpoint.from_directory(path)


def _read(checkpoint: Checkpoint, connect_timeout: str = "10s") -> tuple[str, bytes]:
    """On a worker: where the data is found here, and the data."""
    import dask.config

    with dask.config.set({"dckpt.transfer.connect-timeout": connect_timeout}), \
            checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "weights.bin"), "rb") as f:
            return directory, f.read()


def _read_and_forward(checkpoint: Checkpoint) -> Checkpoint:
    """On a worker: use the checkpoint, then return it (it is pickled here again)."""
    _read(checkpoint)
    return checkpoint


def _cached_ids() -> list[str]:
    from dckpt.cluster._store import local_store

    return [e.checkpoint_id for e in local_store()._cache.entries()]


def _flip_a_byte(path: str) -> Checkpoint:
    with open(os.path.join(path, "weights.bin"), "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    return Checkpoint.from_directory(path)


def _counters(client: Client, address: str) -> tuple[int, int, int]:
    s = stats(client)[address]
    return s["transfers"], s["bytes_received"], s["bytes_sent"]


def _ref(checkpoint: Checkpoint):
    kind, ref = checkpoint.get_internal_representation()
    assert kind == "node_ref"
    return ref


def _on(client: Client, address: str, fn, *args):
    return client.submit(fn, *args, workers=[address], pure=False).result()


def test_a_forwarded_reference_keeps_its_identity_and_is_cached_once(client, workers):
    a, b, c = workers
    data = _content(1)
    original = _on(client, a, _make, data)
    ref = _ref(original)
    forwarded = _on(client, b, _read_and_forward, original)
    again = _ref(forwarded)
    assert (again.checkpoint_id, again.node_id, again.path, again.uris) == (
        ref.checkpoint_id, "node-0", ref.path, ())

    before = _counters(client, c)
    assert _on(client, c, _read, forwarded)[1] == data
    after = _counters(client, c)
    assert (after[0] - before[0], after[1] - before[1]) == (1, SIZE)
    assert _on(client, c, _cached_ids).count(ref.checkpoint_id) == 1  # under the original id
    assert _on(client, c, _read, original)[1] == data
    assert _counters(client, c)[:2] == after[:2]  # the original moves 0 bytes


def test_identical_content_is_one_checkpoint_and_a_changed_byte_a_new_one(client, workers):
    a, b, _ = workers
    data = _content(2)
    on_a = _on(client, a, _make, data)
    on_b = _on(client, b, _make, data)
    assert _ref(on_b).checkpoint_id == _ref(on_a).checkpoint_id
    assert (_ref(on_a).node_id, _ref(on_b).node_id) == ("node-0", "node-1")

    # Node 1 serves that content already: reading node 0's reference there moves nothing.
    before = _counters(client, b)
    where, got = _on(client, b, _read, on_a)
    assert got == data and where == _ref(on_b).path
    assert _counters(client, b)[:2] == before[:2]

    changed = _ref(_on(client, b, _flip_a_byte, _ref(on_b).path))
    assert changed.checkpoint_id != _ref(on_a).checkpoint_id
    assert changed.size == _ref(on_a).size


def test_with_the_origin_gone_a_cached_holder_serves_and_the_error_lists_holders(
    cluster: NodeCluster, client: Client, workers
):
    a, b, c = workers
    first, second = _content(3), _content(4)
    served = _on(client, a, _make, first)
    lost = _on(client, a, _make, second)
    ids = [_ref(served).checkpoint_id, _ref(lost).checkpoint_id]
    assert all(_ref(cp).uris == () for cp in (served, lost))
    for checkpoint in (served, lost):
        assert _on(client, b, _read, checkpoint)[1] in (first, second)
    eventually(lambda: who_has(client, ids),
               lambda held: all(held[cid]["cached"] == [b] for cid in ids),
               what="node 1's cached copies in the registry")
    cluster.kill_node(0)
    try:
        sent = _counters(client, b)[2]
        assert _on(client, c, _read, served)[1] == first  # no URI: node 1 has it
        assert _counters(client, b)[2] - sent == SIZE

        pid = cluster.nodes[1].pid
        os.kill(pid, signal.SIGSTOP)  # listed by the registry, answering nothing
        try:
            with pytest.raises(CheckpointUnavailableError) as info:
                _on(client, c, _read, lost, "1s")
        finally:
            os.kill(pid, signal.SIGCONT)
        message = str(info.value)
        assert f"cached holder: store of node-1 at {b}: TimeoutError" in message, message
        assert f"store of node-0 at {a}: that worker is gone" in message, message
        assert "uri: the reference carries none" in message
    finally:
        cluster.restart_node(0)


def test_a_restarted_worker_serves_what_its_node_still_holds(
    cluster: NodeCluster, client: Client, workers
):
    a, b, _ = workers
    data = _content(5)
    made_before = _on(client, a, _make, data)
    checkpoint_id = _ref(made_before).checkpoint_id
    eventually(lambda: checkpoints(client).get(checkpoint_id, {}).get("holders"),
               lambda holders: bool(holders), what="node 0's checkpoint in the registry")
    restarted = cluster.restart_node(0).worker_address
    assert restarted != a
    listed = eventually(
        lambda: checkpoints(client).get(checkpoint_id, {}).get("holders", []),
        lambda holders: holders == [{"node_id": "node-0", "address": restarted,
                                     "kind": "restarted"}],
        what="the restarted node 0 in the registry again",
    )
    assert listed
    before = _counters(client, b)
    assert _on(client, b, _read, made_before)[1] == data  # made at the old address
    assert _counters(client, b)[1] - before[1] == SIZE
    entry = checkpoints(client)[checkpoint_id]
    assert entry["size"] == SIZE and entry["uris"] == []


def _make_persisted(data: bytes) -> tuple[Checkpoint, str]:
    """On a worker: :func:`_make`, persisted to a URI on this node's disk."""
    from dckpt import _node

    checkpoint = _make(data)
    uri = f"file://{_node.node_root()}/persisted-{uuid.uuid4().hex[:8]}"
    checkpoint.to_uri(uri)
    return checkpoint, uri


def test_the_registry_shows_size_holders_and_uris_per_checkpoint(client, workers):
    a, b, _ = workers
    checkpoint, uri = _on(client, a, _make_persisted, _content(6))
    ref = _ref(checkpoint)
    assert ref.uris == (uri,)
    forwarded = _ref(_on(client, b, _read_and_forward, checkpoint))
    assert forwarded == ref  # id, origin, path, store address and URIs
    entry = eventually(
        lambda: checkpoints(client).get(ref.checkpoint_id),
        lambda e: e is not None and len(e["holders"]) == 2,
        what="both holders in the registry",
    )
    assert entry["size"] == SIZE and entry["uris"] == [uri]
    assert sorted(entry["holders"], key=lambda h: h["node_id"]) == [
        {"node_id": "node-0", "address": a, "kind": "origin"},
        {"node_id": "node-1", "address": b, "kind": "cached"},
    ]


def test_forgetting_one_of_two_identical_directories_keeps_the_other_served(client, workers):
    from dckpt.cluster._forget import forget

    a, b, _ = workers
    data = _content(7)
    first = _on(client, a, _make, data)
    second = _on(client, a, _make, data)  # the same bytes elsewhere on node 0: one id
    assert _ref(first).checkpoint_id == _ref(second).checkpoint_id
    forget(_ref(first), client)
    assert _on(client, b, _read, second)[1] == data
