"""Turn a directory into a node reference where it is pickled; find its data where used.

:func:`make_ref` runs when a directory checkpoint is pickled in a worker process: the
worker's store registers the directory (so it may serve it) and the checkpoint travels
as a :class:`~dckpt.cluster._core.NodeRef`. :func:`resolve` runs when a process first
needs the data, and tries, in this order (DESIGN.md, "References, resolution and
fallbacks"):

1. the same node, where the path still exists: used as it is, no copy;
2. a path under ``dckpt.shared-paths`` that exists here: used as it is;
3. this node's cache, holding that checkpoint id with that digest;
4. the owner's store: streamed into this node's cache;
5. each URI the reference carries: downloaded into this node's cache;
6. otherwise :class:`~dckpt.errors.CheckpointUnavailableError`, listing every step.

Steps 3–5 go through the worker's :class:`NodeStore` (one transfer per node, however
many tasks ask). A process with no store (the driver) keeps its copies in
``<dckpt.temporary-directory>/dckpt-fetched/<pid>/`` instead, which nothing evicts
while it runs and which goes when it exits.
This module runs in task threads, never on the event loop.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

from distributed import Worker, get_client, get_worker
from distributed.utils import sync

from dckpt import _config, node, transfer
from dckpt._locks import is_alive
from dckpt.cluster import _stream
from dckpt.cluster._core import CheckpointId, NodeRef
from dckpt.cluster._store import STORE_KEY, NodeStore, download_into, register_directory
from dckpt.errors import CheckpointUnavailableError

logger = logging.getLogger(__name__)


def make_ref(path: str, uris: tuple[str, ...] = ()) -> NodeRef | None:
    """Register ``path`` with this worker's store and return a reference to it.

    ``None`` when this process is not a worker with a store (the caller then sends
    the data itself). The checkpoint id is derived from the node and the path, so
    pickling the same directory twice registers it once; the digest tells versions
    of its content apart.
    """
    worker = _current_worker()
    if worker is None or not isinstance(worker.state.actors.get(STORE_KEY), NodeStore):
        return None
    real = os.path.realpath(path)
    node_id = node.node_id()
    checkpoint_id = CheckpointId(hashlib.sha256(f"{node_id}\0{real}".encode()).hexdigest()[:32])
    registration = register_directory(real, checkpoint_id, worker)
    return NodeRef(
        node_id=node_id,
        path=real,
        checkpoint_id=checkpoint_id,
        size=registration.manifest.total_bytes,
        digest=registration.manifest.digest,
        store_address=worker.address,
        uris=tuple(uris),
    )


def resolve(ref: NodeRef) -> str:
    """A local directory with the data of ``ref``, found in the order of this module."""
    here = node.node_id()
    tried: list[str] = []
    if ref.node_id == here:
        if os.path.isdir(ref.path):
            return ref.path
        tried.append(f"same node {here}: {ref.path} no longer exists")
    else:
        tried.append(f"same node: this is {here}, not {ref.node_id}")
    if node.is_shared_path(ref.path):
        if os.path.isdir(ref.path):
            return ref.path
        tried.append(f"shared path: {ref.path} does not exist here")
    else:
        tried.append(f"shared path: {ref.path} is not under dckpt.shared-paths")

    worker = _current_worker()
    try:
        return _from_owner(ref, worker)
    except Exception as e:  # noqa: BLE001 (every failure is reported below)
        tried.append(f"store of {ref.node_id} at {ref.store_address}: {_describe(e)}")
    for uri in ref.uris:
        try:
            return _from_uri(ref, uri, worker)
        except Exception as e:  # noqa: BLE001
            tried.append(f"uri {uri}: {_describe(e)}")
    if not ref.uris:
        tried.append("uri: the reference carries none (persist it with to_uri())")
    steps = "\n".join(f"  {i}. {step}" for i, step in enumerate(tried, 1))
    raise CheckpointUnavailableError(
        f"checkpoint {ref.checkpoint_id} of node {ref.node_id} ({ref.path}, "
        f"{ref.size} bytes) cannot be had here (node {here}). Tried:\n{steps}"
    )


@contextlib.contextmanager
def pinned_copy(ref: NodeRef, path: str | None) -> Iterator[str]:
    """A local directory with the data of ``ref``, kept from eviction for the block.

    ``path`` is where ``ref`` was found before, if anywhere: used again while it
    exists, resolved anew (:func:`resolve`) otherwise. On a worker with a store the
    checkpoint is pinned in this node's cache before it is looked up, so that nothing
    can evict it between finding it and leaving the block. The driver's copies are
    never evicted.
    """
    worker = _current_worker()
    store = worker.state.actors.get(STORE_KEY) if worker is not None else None
    pins = store._cache.pinned(ref.checkpoint_id) if isinstance(store, NodeStore) \
        else contextlib.nullcontext()
    with pins:
        if path is None or not os.path.isdir(path):
            path = resolve(ref)
        yield path


def _from_owner(ref: NodeRef, worker: Worker | None) -> str:
    """Steps 3 and 4: this node's cache, else a copy from the owner's store."""
    if worker is not None:
        store = worker.state.actors.get(STORE_KEY)
        if isinstance(store, NodeStore):
            path: str = sync(
                worker.loop, store.fetch, ref.store_address, ref.checkpoint_id, ref.digest
            )
            return path
    target = _driver_copy(ref)
    if os.path.isdir(target):
        return target
    client = get_client()

    async def target_for(manifest: transfer.Manifest) -> str:
        return target

    client.sync(_stream.pull, client.rpc, ref.store_address, ref.checkpoint_id, ref.digest,
                target_for)
    return target


def _from_uri(ref: NodeRef, uri: str, worker: Worker | None) -> str:
    """Step 5: download into this node's cache (or the driver's folder)."""
    store = worker.state.actors.get(STORE_KEY) if worker is not None else None
    if worker is not None and isinstance(store, NodeStore):
        path: str = sync(worker.loop, store.fetch_uri, uri, ref.checkpoint_id, ref.digest,
                         ref.size)
        return path
    target = _driver_copy(ref)
    if not os.path.isdir(target):
        download_into(uri, target)
    return target


def _driver_copy(ref: NodeRef) -> str:
    root = _fetched_root(os.path.join(_config.temporary_directory(), "dckpt-fetched"),
                         os.getpid())
    return os.path.join(root, f"{ref.checkpoint_id}-{ref.digest[:16]}")


@functools.cache
def _fetched_root(base: str, pid: int) -> str:
    """This process's folder of copies under ``base``, removed when the process exits.

    Nothing evicts these copies while the process lives (its checkpoint objects point
    at them); at exit they go, and folders that processes which died left behind go
    the first time another process makes its own. Keyed by pid as well, so a forked
    child does not share, and remove, its parent's folder.
    """
    os.makedirs(base, exist_ok=True)
    for name in os.listdir(base):
        if name.isdigit() and int(name) != pid and not is_alive(int(name)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    root = os.path.join(base, str(pid))
    os.makedirs(root, exist_ok=True)
    atexit.register(_remove_if_mine, root, pid)
    return root


def _remove_if_mine(root: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child, which inherits the atexit hook
        shutil.rmtree(root, ignore_errors=True)


def _current_worker() -> Worker | None:
    """This process's worker: the one running the current task, else the only one.

    Task results are pickled outside the task (on the event loop or a comm thread),
    where ``get_worker()`` knows no worker; a worker process has exactly one.
    """
    try:
        return get_worker()
    except ValueError:
        pass
    workers = [w for w in list(Worker._instances) if w.status.name == "running"]
    return workers[0] if len(workers) == 1 else None


def _describe(error: Any) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]
