"""The check every cluster test ends with (tests/_clean.py) finds what it must.

A pin left on a cached checkpoint and a staging directory left in a node's cache are
each reported, naming the node; once removed, the node is clean again.
"""

from __future__ import annotations

import os
import random
import uuid
from typing import Any

import pytest
from distributed import Client

from dckpt import Checkpoint
from dckpt.cluster._store import store_of
from tests._clean import leftovers

pytestmark = pytest.mark.slow


def _make_checkpoint() -> Checkpoint:
    """On a worker: a directory checkpoint of its own under this node's root."""
    from dckpt import node_root

    path = os.path.join(node_root(), f"clean-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(random.Random(path).randbytes(1 << 16))
    return Checkpoint.from_directory(path)


def _pin(checkpoint_id: str, pin: bool, dask_worker: Any = None) -> None:
    """On a worker (``client.run``): pin or unpin a cached checkpoint in its cache."""
    from dckpt.cluster._store import local_store

    cache = local_store(dask_worker)._cache  # the test reaches in to leave what a leak would
    (cache.pin if pin else cache.unpin)(checkpoint_id)


def _staging(name: str, make: bool) -> None:
    """On a worker: make (or remove) a staging directory in this node's cache."""
    from dckpt._node import cache_directory

    path = os.path.join(cache_directory(), name)
    os.mkdir(path) if make else os.rmdir(path)


def test_a_pin_left_behind_is_found(node_client: Client, nodes):
    owner, receiver = nodes
    checkpoint = node_client.submit(_make_checkpoint, workers=[owner], pure=False).result()
    _, ref = checkpoint.get_internal_representation()
    store_of(receiver, node_client).materialize(ref).result()  # cached on the receiver
    assert leftovers(node_client, nodes) == {}
    node_client.run(_pin, ref.checkpoint_id, True, workers=[receiver])
    try:
        assert leftovers(node_client, nodes) == {receiver: {"pinned": [ref.checkpoint_id]}}
    finally:
        node_client.run(_pin, ref.checkpoint_id, False, workers=[receiver])
    assert leftovers(node_client, nodes) == {}


def test_a_partial_write_left_behind_is_found(node_client: Client, nodes):
    _, receiver = nodes
    name = f".clean.{os.getpid()}.{uuid.uuid4().hex[:12]}.partial"
    node_client.run(_staging, name, True, workers=[receiver])
    try:
        assert leftovers(node_client, nodes) == {receiver: {"partial writes": [name]}}
    finally:
        node_client.run(_staging, name, False, workers=[receiver])
    assert leftovers(node_client, nodes) == {}
