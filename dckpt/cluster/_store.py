"""``NodeStore``: the actor on every worker that serves and caches checkpoints.

One store per Dask worker, created by :class:`~dckpt.cluster._worker_plugin.NodeStorePlugin`
and reachable by anyone as an actor proxy (:func:`store_of`). It serves the
directories registered with it on its own node (never any other path), and copies
checkpoints of other nodes into this node's cache, one transfer per checkpoint however
many tasks ask at once.

Which side of the wire runs what: :meth:`NodeStore.manifest` and
:meth:`NodeStore.read_chunk` run on the *owner's* worker, in distributed's actor thread
(blocking file I/O is fine there); :meth:`NodeStore.fetch` is a coroutine that runs on
the *receiver's* event loop and drives the transfer (:func:`dckpt.transfer.receive_directory`
decodes and writes chunks in threads).

Registration is deliberately not an actor method: anything reachable through the proxy
can be called from any process, and letting a remote caller register ``/etc`` would make
"serves only registered directories" meaningless. Code on the worker registers through
:func:`register_directory`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from typing import Any

import dask.config
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client, get_worker
from distributed.actor import Actor
from distributed.worker import Worker

from dckpt import node, transfer
from dckpt.cluster._cache import CheckpointId, NodeCache
from dckpt.errors import CheckpointNotFoundError

logger = logging.getLogger(__name__)

#: The key of every worker's store in ``worker.state.actors``.
STORE_KEY = "dckpt-node-store"


@dataclass(frozen=True)
class Registration:
    """A directory this node serves."""

    checkpoint_id: CheckpointId
    path: str
    manifest: transfer.Manifest


class _Registry:
    """The directories a store may serve; reachable only from code on its worker."""

    _by_id: dict[CheckpointId, Registration]
    _lock: threading.Lock

    def __init__(self) -> None:
        self._by_id = {}
        self._lock = threading.Lock()

    def add(self, path: str, checkpoint_id: CheckpointId) -> Registration:
        path = os.path.realpath(path)
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"cannot serve {path}: not a directory")
        registration = Registration(checkpoint_id, path, transfer.build_manifest(path))
        with self._lock:
            self._by_id[checkpoint_id] = registration
        return registration

    def get(self, checkpoint_id: CheckpointId) -> Registration:
        with self._lock:
            registration = self._by_id.get(checkpoint_id)
        if registration is None:
            raise PermissionError(
                f"checkpoint {checkpoint_id!r} is not registered with this node's store; "
                "a store serves only directories registered on its own node"
            )
        return registration

    def ids(self) -> list[CheckpointId]:
        with self._lock:
            return list(self._by_id)

    def sizes(self) -> dict[CheckpointId, int]:
        with self._lock:
            return {cid: r.manifest.total_bytes for cid, r in self._by_id.items()}


class NodeStore:
    """Serves registered directories and keeps this node's cache of others' checkpoints.

    Counters (:meth:`stats`): ``bytes_sent``, ``bytes_received``, ``transfers``
    (checkpoints received), ``chunks_sent``, ``cache_hits``, ``cache_misses`` and the
    cache's own figures.
    """

    node_id: str
    address: str
    _registry: _Registry
    _cache: NodeCache
    _counters: collections.Counter[str]
    _counter_lock: threading.Lock
    _in_flight: dict[tuple[CheckpointId, str], asyncio.Future[str]]
    _sources: dict[CheckpointId, transfer.ChunkSource]
    _corrupt_next_chunks: int

    def __init__(self, address: str, cache_root: str | None = None) -> None:
        self.node_id = node.node_id()
        self.address = address
        self._registry = _Registry()
        self._cache = NodeCache(cache_root)
        self._counters = collections.Counter()
        self._counter_lock = threading.Lock()
        self._in_flight = {}
        self._sources = {}
        self._corrupt_next_chunks = 0

    # ---------------------------------------------------------------- owner side

    def manifest(self, checkpoint_id: CheckpointId) -> dict[str, Any]:
        """The manifest of a registered checkpoint, as plain data."""
        return self._registry.get(checkpoint_id).manifest.to_dict()

    def read_chunk(
        self, checkpoint_id: CheckpointId, file_index: int, offset: int, length: int
    ) -> memoryview:
        """One encoded chunk of a registered checkpoint (actor thread).

        A memoryview, not bytes: distributed hands a received memoryview to the caller
        as it is, where bytes would be joined into a second copy on the receiver's event
        loop (benchmarks/bench_transfer.py measured the comm ceiling at 8 MiB chunks:
        about 1.9 GB/s against 1.0).
        """
        registration = self._registry.get(checkpoint_id)
        source = self._sources.get(checkpoint_id)
        if source is None:
            source = transfer.ChunkSource(
                registration.path, registration.manifest, _chunk_bytes()
            )
            source = self._sources.setdefault(checkpoint_id, source)
        frame = source.read_chunk(transfer.ChunkSpec(file_index, offset, length))
        self._count(bytes_sent=length, chunks_sent=1)
        with self._counter_lock:
            corrupt = self._corrupt_next_chunks > 0
            self._corrupt_next_chunks -= corrupt
        if corrupt:
            damaged = bytearray(frame)
            damaged[-1] ^= 0x01
            return memoryview(damaged)
        return memoryview(frame)

    def corrupt_next_chunks(self, count: int) -> None:
        """Test hook: flip one byte in each of the next ``count`` chunks sent.

        It stands for damage in transit; receivers detect it by the chunk's checksum
        and fetch the chunk again (``dckpt.transfer.retries``).
        """
        with self._counter_lock:
            self._corrupt_next_chunks = int(count)

    # ------------------------------------------------------------- receiver side

    async def fetch(self, owner_address: str, checkpoint_id: CheckpointId, digest: str) -> str:
        """Copy a checkpoint from the store at ``owner_address`` into this node's cache.

        Returns the local path. A cached copy with the same digest is used as it is;
        concurrent calls for one checkpoint wait for a single transfer.
        """
        # The cache writes its index and may delete directories: not on the event loop.
        cached = await asyncio.to_thread(self._cache.lookup, checkpoint_id, digest)
        if cached is not None:
            self._count(cache_hits=1)
            return cached
        key = (checkpoint_id, digest)
        waiting = self._in_flight.get(key)
        if waiting is not None:
            return await asyncio.shield(waiting)
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = done
        try:
            path = await self._transfer(owner_address, checkpoint_id, digest)
        except BaseException as e:
            done.set_exception(e)
            done.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        else:
            done.set_result(path)
            return path
        finally:
            del self._in_flight[key]

    async def _transfer(self, owner_address: str, checkpoint_id: CheckpointId, digest: str) -> str:
        self._count(cache_misses=1)
        owner = store_of(owner_address)
        # A dead owner is found out by its first call: bounded, so that resolution can
        # go on to the next source (a URI) instead of waiting for the comm's own timeout.
        timeout = parse_timedelta(dask.config.get("dckpt.transfer.connect-timeout"))
        raw = await asyncio.wait_for(_awaitable(owner.manifest(checkpoint_id)), timeout)
        manifest = transfer.Manifest.from_dict(raw)
        if manifest.digest != digest:
            raise CheckpointNotFoundError(
                f"checkpoint {checkpoint_id!r} on {owner_address} changed since it was "
                f"referenced (digest {manifest.digest[:12]}, expected {digest[:12]})"
            )
        await asyncio.to_thread(self._cache.reserve, manifest.total_bytes)

        # receive_from renames its result into ``target``, and the cache renames
        # that into place: both stay inside the cache's filesystem.
        staging = self._cache.staging_directory(checkpoint_id)
        try:
            target = os.path.join(staging, "data")
            await receive_from(owner, checkpoint_id, manifest, target)
            path = await asyncio.to_thread(
                self._cache.add, checkpoint_id, digest, target, manifest.total_bytes
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        self._count(bytes_received=manifest.total_bytes, transfers=1)
        logger.debug("received %s (%d bytes) from %s", checkpoint_id, manifest.total_bytes,
                     owner_address)
        return path

    # ------------------------------------------------------------------ both

    def holdings(self) -> dict[str, dict[CheckpointId, int]]:
        """A snapshot of what this node holds: ``{"origin": {id: bytes}, "cached": {id: bytes}}``.

        ``origin`` are the directories registered here, ``cached`` the copies in this
        node's cache. Sent whole (not as changes), so a lost message costs nothing.
        """
        return {
            "origin": self._registry.sizes(),
            "cached": {e.checkpoint_id: e.size for e in self._cache.entries()},
        }

    def stats(self) -> dict[str, Any]:
        """This store's counters and its cache's figures."""
        with self._counter_lock:
            counters = dict(self._counters)
        return {
            "node_id": self.node_id,
            "address": self.address,
            "registered": len(self._registry.ids()),
            **{name: counters.get(name, 0) for name in _COUNTERS},
            "cache": self._cache.stats(),
        }

    def _count(self, **amounts: int) -> None:
        with self._counter_lock:
            self._counters.update(amounts)


_COUNTERS = ("bytes_sent", "bytes_received", "transfers", "chunks_sent",
             "cache_hits", "cache_misses")


def _chunk_bytes() -> int:
    return parse_bytes(dask.config.get("dckpt.transfer.chunk-bytes"))


async def receive_from(
    owner: Actor, checkpoint_id: CheckpointId, manifest: transfer.Manifest, target: str
) -> None:
    """Copy a checkpoint from the store behind ``owner`` into ``target``, by chunks."""

    async def fetch_chunk(spec: transfer.ChunkSpec) -> bytes | memoryview:
        frame: bytes | memoryview = await owner.read_chunk(
            checkpoint_id, spec.file_index, spec.offset, spec.length
        )
        return frame

    await transfer.receive_directory(manifest, fetch_chunk, target, chunk_bytes=_chunk_bytes())


def store_of(worker_address: str, client: Client | None = None) -> Actor:
    """An actor proxy for the store of the worker at ``worker_address``.

    On a worker the proxy uses that worker's connections; elsewhere it uses
    ``client``, or the default client when none is given.
    """
    if client is None:
        proxy = Actor(NodeStore, worker_address, STORE_KEY)
    else:
        with client.as_current():  # the proxy binds to the current client when created
            proxy = Actor(NodeStore, worker_address, STORE_KEY)
    # The store is no task: there is no future to wait for when its worker is
    # unreachable, and distributed's proxy would wait on this one forever.
    proxy._future = None
    return proxy


async def _awaitable(future: Any) -> Any:
    return await future


def local_store(worker: Worker | None = None) -> NodeStore:
    """The store of this worker (the object itself, not a proxy)."""
    worker = worker or get_worker()
    store = worker.state.actors.get(STORE_KEY)
    if not isinstance(store, NodeStore):
        raise RuntimeError(
            f"worker {worker.address} has no dckpt NodeStore; install it with "
            "dckpt.cluster.install(client) or the scheduler preload"
        )
    return store


def register_directory(path: str, checkpoint_id: CheckpointId, worker: Worker | None = None) -> Registration:
    """Let this worker's store serve ``path`` as ``checkpoint_id`` (local code only)."""
    return local_store(worker)._registry.add(path, checkpoint_id)


def stats(client: Client) -> dict[str, dict[str, Any]]:
    """The counters of every worker's store, by worker address."""
    result: dict[str, dict[str, Any]] = client.run(_local_stats)
    return result


def _local_stats(dask_worker: Worker) -> dict[str, Any]:
    return local_store(dask_worker).stats()
