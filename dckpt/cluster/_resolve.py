"""Turn a directory into a node reference where it is pickled; find its data where used.

:func:`make_ref` runs when a directory checkpoint is pickled in a worker process: the
worker's store registers the directory (so it may serve it) and the checkpoint travels
as a :class:`~dckpt.cluster._core.NodeRef`. Its id is that of its content
(:attr:`dckpt.transfer.Manifest.content_id`: relative paths, sizes, modes, link
targets and each file's xxh3-128 hash), so copies anywhere have the same id, the same
bytes in two directories are one checkpoint, and a reference pickled again where only
a copy is (``Checkpoint.__getstate__``) keeps the original id, origin and URIs.

:func:`resolve` runs when a process first needs the data, and tries, in this order
(DESIGN.md, "Identity, holders, resolution and fallbacks"):

1. the same node, where the path still exists: used as it is, no copy;
2. a path under ``dckpt.shared-paths`` that exists here, or a path that shows here the
   very files the origin fingerprinted (a shared disk found, not configured:
   :mod:`dckpt.cluster._shared`): used as it is;
3. a directory this node serves with the same content (the same id), used as it is;
   else this node's cache, holding that checkpoint id;
4. every holder the scheduler's registry names (``dckpt_holders``): nodes with a
   cached copy that are not serving many transfers already first, then the origin
   node at the worker it has *now* (a restarted worker has a new address; the one in
   the reference is tried only while the scheduler still knows it), then busy
   holders — each streamed into this node's cache;
5. each URI the reference carries: downloaded into this node's cache;
6. otherwise :class:`~dckpt.errors.CheckpointUnavailableError`, listing every step
   and every holder tried, and why each failed.

Without a registry (workers given stores by the worker preload alone), step 4 is the
store at the reference's address.

A failure of step 4 or 5 moves on to the next source only when another source could
do better (:func:`_fixable_elsewhere`): a lost connection, a store that is gone or
does not answer, the holder's own disk errors, a damaged stream. What no other source
can fix is raised at once, as it is, naming this node: this node's cache too small or
its disk full (:class:`~dckpt.errors.CacheFullError`), an unsafe or malformed manifest
(:class:`~dckpt.errors.UnsafePathError`, :class:`~dckpt.errors.CheckpointFormatError`),
a programming error.

Steps 3–5 go through the worker's :class:`NodeStore` (one transfer per node, however
many tasks ask). A process with no store (the driver) keeps its copies in
``<dckpt.temporary-directory>/dckpt-fetched/<pid>/`` instead, which nothing evicts
while it runs and which goes when it exits.
This module runs in task threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import dataclasses
import functools
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import dask.config
from dask.utils import parse_timedelta

from distributed import Worker, get_client, get_worker
from distributed.utils import sync

from dckpt import _config, node, transfer
from dckpt._locks import is_alive
from dckpt.cluster import _shared, _stream
from dckpt.cluster._cache import MAX_BYTES_SETTING, MAX_BYTES_VARIABLE
from dckpt.cluster._core import NodeRef
from dckpt.cluster._store import STORE_KEY, NodeStore, download_into, register_directory
from dckpt.errors import (
    CacheFullError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointUnavailableError,
    CorruptChunkError,
)

logger = logging.getLogger(__name__)


def make_ref(path: str, uris: tuple[str, ...] = ()) -> NodeRef | None:
    """Register ``path`` with this worker's store and return a reference to it.

    ``None`` when this process is not a worker with a store (the caller then sends
    the data itself). The checkpoint id is that of the directory's content: pickling
    the same directory again registers it once (and hashes nothing again), and a
    directory written since gets a new id.

    The first pickling hashes every file (about 0.12 s per GiB in the page cache, see
    :mod:`dckpt.transfer._hashes`) in the thread that pickles: for a task's result
    that may be the worker's event loop. A task that returns a checkpoint of many GiB
    can take that off the loop by pickling it once itself (``pickle.dumps(checkpoint)``
    before returning it): the hashes are remembered.
    """
    worker = _current_worker()
    if worker is None or not isinstance(worker.state.actors.get(STORE_KEY), NodeStore):
        return None
    real = os.path.realpath(path)
    registration = register_directory(real, worker, tuple(uris))
    return NodeRef(
        node_id=node.node_id(),
        path=real,
        checkpoint_id=registration.checkpoint_id,
        size=registration.manifest.total_bytes,
        digest=registration.manifest.digest,
        store_address=worker.address,
        uris=registration.uris,
        fingerprint=_shared.fingerprint(real),
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
        same, why_not = _shared.same_files(ref.path, ref.fingerprint, ref.node_id)
        if same:
            return ref.path
        tried.append(f"shared path: {ref.path} is not under dckpt.shared-paths, and {why_not}")

    worker = _current_worker()
    store = worker.state.actors.get(STORE_KEY) if worker is not None else None
    if worker is not None and isinstance(store, NodeStore):
        served: str | None = sync(worker.loop, store.served, ref.checkpoint_id)
        if served is not None:
            return served
    cached = _cached_here(ref, worker)
    if cached is not None:
        return cached
    tried.append(f"this node's cache: no copy of {ref.checkpoint_id}")
    holders, notes = order_holders(_ask_registry(ref, worker), ref, here)
    tried += notes
    for holder in holders:
        try:
            return _from_holder(ref, holder, worker)
        except Exception as e:  # noqa: BLE001 (what another source may fix is reported below)
            _raise_unless_fixable_elsewhere(e, ref, here, holder.describe())
            tried.append(f"{holder.describe()}: {_describe(e)}")
    for uri in ref.uris:
        try:
            return _from_uri(ref, uri, worker)
        except Exception as e:  # noqa: BLE001
            _raise_unless_fixable_elsewhere(e, ref, here, uri)
            tried.append(f"uri {uri}: {_describe(e)}")
    if not ref.uris:
        tried.append("uri: the reference carries none (persist it with to_uri())")
    steps = "\n".join(f"  {i}. {step}" for i, step in enumerate(tried, 1))
    raise CheckpointUnavailableError(
        f"checkpoint {ref.checkpoint_id} of node {ref.node_id} ({ref.path}, "
        f"{ref.size} bytes) cannot be had here (node {here}). Tried:\n{steps}"
    )


#: A holder sending this many transfers at once counts as busy: the origin is asked
#: before it (the registry's count lags by about ``dckpt.registry.interval``).
BUSY_SERVING = 4


@dataclasses.dataclass(frozen=True)
class Holder:
    """A store that the registry says holds a checkpoint (or the reference's own)."""

    address: str
    node_id: str
    kind: str  # "origin" or "cached"
    serving: int = 0

    def describe(self) -> str:
        return f"{self.kind} holder: store of {self.node_id} at {self.address}"


def order_holders(
    answer: Mapping[str, Any] | None, ref: NodeRef, here: str
) -> tuple[list[Holder], list[str]]:
    """The holders to try, in order, and notes for the error message (step 4).

    ``answer`` is the registry's (``dckpt_holders``), or None without a registry: then
    the reference's own store address is all there is. Holders on this node are left
    out (its cache was looked at, its origin path too); holders on other nodes that
    serve fewer than :data:`BUSY_SERVING` transfers come first, fewest first, then the
    origin node's workers, then the busy ones. The reference's address is tried while
    the scheduler knows that worker (the registry's snapshots may lag behind a
    reference made a moment ago); once it is gone, the origin node is reached through
    the workers the registry lists for it now.
    """
    origin = Holder(ref.store_address, ref.node_id, "origin")
    if answer is None:
        return ([origin] if ref.node_id != here else []), []
    others: list[Holder] = []
    origins: list[Holder] = []
    for item in answer.get("holders", ()):
        holder = Holder(str(item["address"]), str(item["node_id"]), str(item["kind"]),
                        int(item.get("serving", 0)))
        if holder.node_id == here:
            continue
        (origins if holder.node_id == ref.node_id else others).append(holder)
    notes: list[str] = []
    if ref.node_id != here:
        if answer.get("address_alive"):
            if all(h.address != ref.store_address for h in origins):
                origins.insert(0, origin)
        elif not origins:
            current = list(answer.get("node_addresses", ()))
            notes.append(
                f"store of {ref.node_id} at {ref.store_address}: that worker is gone, and "
                + (f"the workers {ref.node_id} has now ({', '.join(current)}) do not hold it"
                   if current else f"no worker of {ref.node_id} is in the registry")
            )
    others.sort(key=lambda h: (h.serving, h.kind != "cached", h.address))
    idle = [h for h in others if h.serving < BUSY_SERVING]
    busy = [h for h in others if h.serving >= BUSY_SERVING]
    return idle + origins + busy, notes


def _ask_registry(ref: NodeRef, worker: Worker | None) -> Mapping[str, Any] | None:
    """The registry's ``dckpt_holders`` answer, or None if there is no registry."""
    timeout = parse_timedelta(dask.config.get("dckpt.transfer.connect-timeout"))

    async def ask(scheduler: Any) -> Any:
        return await asyncio.wait_for(
            scheduler.dckpt_holders(checkpoint_id=ref.checkpoint_id, node_id=ref.node_id,
                                    address=ref.store_address),
            timeout,
        )

    try:
        if worker is not None:
            answer = sync(worker.loop, ask, worker.scheduler)
        else:
            client = get_client()
            answer = client.sync(ask, client.scheduler)
    except Exception as e:  # noqa: BLE001 - no registry to ask: the reference's store
        logger.info("could not ask the scheduler who holds %s (%r); trying %s",
                    ref.checkpoint_id, e, ref.store_address)
        return None
    return answer if isinstance(answer, Mapping) else None


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


def _cached_here(ref: NodeRef, worker: Worker | None) -> str | None:
    """Step 3: this node's cached copy (or the driver's own copy), if any."""
    store = worker.state.actors.get(STORE_KEY) if worker is not None else None
    if worker is not None and isinstance(store, NodeStore):
        path: str | None = sync(worker.loop, store.cached, ref.checkpoint_id, ref.digest)
        return path
    target = _driver_copy(ref)
    return target if os.path.isdir(target) else None


def _from_holder(ref: NodeRef, holder: Holder, worker: Worker | None) -> str:
    """Step 4: a copy from ``holder``'s store, into this node's cache (or the driver's)."""
    if worker is not None:
        store = worker.state.actors.get(STORE_KEY)
        if isinstance(store, NodeStore):
            path: str = sync(
                worker.loop, store.fetch, holder.address, ref.checkpoint_id, ref.digest,
                holder.node_id,
            )
            return path
    target = _driver_copy(ref)
    if os.path.isdir(target):
        return target
    client = get_client()

    async def target_for(manifest: transfer.Manifest) -> str:
        return target

    client.sync(_stream.pull, client.rpc, holder.address, ref.checkpoint_id, ref.digest,
                target_for, node_id=holder.node_id)
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


# Errors of this node's disk: the next source would need the same room.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _fixable_elsewhere(error: BaseException) -> bool:
    """Whether another holder or a URI might succeed where this source failed.

    Yes for what is about the source or the way there: a lost or refused connection,
    a store that is gone or does not answer (``OSError``, ``TimeoutError``), a holder
    that no longer has it or failed to read it (reported as a
    :class:`~dckpt.errors.CheckpointError`), a chunk damaged on the way
    (:class:`~dckpt.errors.CorruptChunkError`). No for what is about this node or
    the data itself: its cache too small (:class:`~dckpt.errors.CacheFullError`) or
    its disk full, a manifest with unsafe or malformed entries
    (:class:`~dckpt.errors.CheckpointFormatError`, which a copy elsewhere shares),
    and everything else (bad settings, programming errors).
    """
    if isinstance(error, CacheFullError):
        return False
    if isinstance(error, CorruptChunkError):
        return True
    if isinstance(error, CheckpointFormatError):
        return False
    if isinstance(error, OSError):
        # A remote failure arrives as a message (no errno): an errno is this node's.
        return error.errno not in _DISK_FULL
    return isinstance(error, (CheckpointError, asyncio.TimeoutError))


def _raise_unless_fixable_elsewhere(
    error: Exception, ref: NodeRef, here: str, source: str
) -> None:
    """Raise ``error`` (naming this node) if no other source can fix it; else return."""
    if _fixable_elsewhere(error):
        return
    doing = (f"node {here} copying checkpoint {ref.checkpoint_id} of node {ref.node_id} "
             f"({ref.size} bytes) from {source}")
    if isinstance(error, CacheFullError):
        raise CacheFullError(f"{doing}: {error}") from error
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        raise CacheFullError(
            f"{doing}: the disk of the node cache is full ({error}). Free space there, "
            f"or lower `{MAX_BYTES_SETTING}` ({MAX_BYTES_VARIABLE}) on the workers to what "
            "the disk can hold."
        ) from error
    if isinstance(error, CheckpointError):
        try:
            renamed: Exception | None = type(error)(f"{doing}: {error}")
        except Exception:  # noqa: BLE001 - a constructor of another shape: as it is
            renamed = None
        if renamed is None:
            raise error
        raise renamed from error
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(f"while {doing}")
    raise error


def _describe(error: Any) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:500]
