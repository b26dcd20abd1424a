"""``NodeStore``: the actor on every worker that serves and caches checkpoints.

One store per Dask worker, created by :class:`~dckpt.cluster._worker_plugin.NodeStorePlugin`
and reachable by anyone as an actor proxy (:func:`store_of`). It serves the
directories registered with it on its own node (never any other path), and copies
checkpoints of other nodes into this node's cache, one transfer per checkpoint however
many tasks ask at once.

Bytes move over the worker's own server, not through actor calls
(:mod:`dckpt.cluster._stream`): :meth:`NodeStore.serve_pull` is the handler
``dckpt_pull`` on the *owner's* worker, :meth:`NodeStore.fetch` runs on the
*receiver's* event loop and drives the transfer, and :meth:`NodeStore.accept_push`
(handler ``dckpt_push``) takes a checkpoint that the driver sends. Everything runs on
the event loop; file reads, decoding and writes go to threads.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from distributed import Client, get_worker
from distributed.actor import Actor
from distributed.comm import Comm
from distributed.core import ConnectionPool, Status
from distributed.worker import Worker

from dckpt import node, storage, transfer
from dckpt.cluster import _stream
from dckpt.cluster._cache import CheckpointId, NodeCache
from dckpt.errors import CheckpointNotFoundError
from dckpt.formats._atomic import atomic_directory

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

    def add(
        self, path: str, checkpoint_id: CheckpointId, manifest: transfer.Manifest | None = None
    ) -> Registration:
        """Serve ``path``; ``manifest`` is what it was received as, if it is a copy.

        A received copy keeps the manifest (and so the digest) it was sent with: its
        files are new, and a manifest built from them would name another version.
        """
        path = os.path.realpath(path)
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"cannot serve {path}: not a directory")
        registration = Registration(
            checkpoint_id, path, manifest if manifest is not None else transfer.build_manifest(path)
        )
        with self._lock:
            self._by_id[checkpoint_id] = registration
        return registration

    def get(self, checkpoint_id: CheckpointId) -> Registration:
        with self._lock:
            registration = self._by_id.get(checkpoint_id)
        if registration is not None and not os.path.isdir(registration.path):
            # Removed by its owner, or a pushed copy the cache evicted.
            with self._lock:
                self._by_id.pop(checkpoint_id, None)
            raise CheckpointNotFoundError(
                f"checkpoint {checkpoint_id!r} was at {registration.path}, which is gone"
            )
        if registration is None:
            raise PermissionError(
                f"checkpoint {checkpoint_id!r} is not registered with this node's store; "
                "a store serves only directories registered on its own node"
            )
        return registration

    def remove(self, checkpoint_id: CheckpointId) -> Registration | None:
        """Stop serving ``checkpoint_id``; its registration, or None if it had none.

        The directory itself is left alone: whoever removes the registration decides.
        """
        with self._lock:
            return self._by_id.pop(checkpoint_id, None)

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
    _corrupt_next_chunks: int
    _rpc: ConnectionPool | None

    def __init__(self, address: str, cache_root: str | None = None) -> None:
        self.node_id = node.node_id()
        self.address = address
        self._registry = _Registry()
        self._cache = NodeCache(cache_root)
        self._counters = collections.Counter()
        self._counter_lock = threading.Lock()
        self._in_flight = {}
        self._corrupt_next_chunks = 0
        self._rpc = None

    def attach(self, worker: Worker) -> None:
        """Serve ``dckpt_pull`` and ``dckpt_push`` on ``worker``'s server; use its comms."""
        worker.handlers[_stream.PULL_OP] = self.serve_pull
        worker.handlers[_stream.PUSH_OP] = self.accept_push
        self._rpc = worker.rpc

    # ---------------------------------------------------------------- owner side

    def manifest(self, checkpoint_id: CheckpointId) -> dict[str, Any]:
        """The manifest of a registered checkpoint, as plain data."""
        return self._registry.get(checkpoint_id).manifest.to_dict()

    async def serve_pull(
        self, comm: Comm, checkpoint_id: CheckpointId, chunk_bytes: int
    ) -> Status:
        """Handler ``dckpt_pull``: send a registered checkpoint to whoever asks.

        Anything not registered here is refused (``kind: refused``), whatever path or
        id is asked for.
        """
        try:
            registration = self._registry.get(checkpoint_id)
            source = transfer.ChunkSource(registration.path, registration.manifest, chunk_bytes)
        except Exception as e:  # noqa: BLE001 - every refusal goes to the receiver
            await comm.write(_stream.error_reply(e))
            return Status.dont_reply
        with source:
            await comm.write({"status": "OK", "manifest": registration.manifest.to_dict()})
            await _stream.serve_chunks(comm, source, on_chunk=self._sent)
        return Status.dont_reply

    def _sent(self, length: int) -> bool:
        """Count a chunk sent; True when the test hook wants it damaged."""
        with self._counter_lock:
            self._counters.update(bytes_sent=length, chunks_sent=1)
            corrupt = self._corrupt_next_chunks > 0
            self._corrupt_next_chunks -= corrupt
        return corrupt

    def corrupt_next_chunks(self, count: int) -> None:
        """Test hook: flip one byte in each of the next ``count`` chunks sent.

        It stands for damage in transit; receivers detect it by the chunk's checksum
        and fetch the chunk again (``dckpt.transfer.retries``).
        """
        with self._counter_lock:
            self._corrupt_next_chunks = int(count)

    # ------------------------------------------------------------- receiver side

    async def fetch(
        self, owner_address: str, checkpoint_id: CheckpointId, digest: str,
        owner_node: str | None = None,
    ) -> str:
        """Copy a checkpoint from the store at ``owner_address`` into this node's cache.

        Returns the local path. A cached copy with the same digest is used as it is;
        concurrent calls for one checkpoint wait for a single transfer. ``owner_node``,
        if known, names the owner in error messages.
        """

        async def transfer_from_owner() -> str:
            async def target_for(manifest: transfer.Manifest) -> str:
                return await self._prepare(checkpoint_id, manifest.total_bytes, staging)

            staging: list[str] = []
            try:
                manifest = await _stream.pull(self._pool(), owner_address, checkpoint_id,
                                              digest, target_for, node_id=owner_node)
                return await self._commit(checkpoint_id, digest, manifest.total_bytes,
                                          staging[0], owner_address)
            finally:
                await self._discard(staging)

        return await self._single_flight(checkpoint_id, digest, transfer_from_owner)

    async def accept_push(
        self,
        comm: Comm,
        checkpoint_id: CheckpointId,
        manifest: dict[str, Any],
        chunk_bytes: int,
    ) -> dict[str, Any] | Status:
        """Handler ``dckpt_push``: take a checkpoint that the driver sends into the cache.

        The pushed copy is also registered, so that other nodes can pull it from here
        (until the cache evicts it). Replies ``{"status": "OK", "node_id", "path"}``.
        """
        peer = f"the pusher at {comm.peer_address}"
        try:
            streamed = False  # whether this call asked for the chunks (and said "done")
            checked = transfer.Manifest.from_dict(manifest)
            chunk_bytes = transfer.check_chunk_bytes(chunk_bytes)

            async def receive() -> str:
                nonlocal streamed
                streamed = True
                staging: list[str] = []
                try:
                    target = await self._prepare(checkpoint_id, checked.total_bytes, staging)
                    await _stream.stream_over(comm, peer, checked, target, chunk_bytes=chunk_bytes)
                    return await self._commit(checkpoint_id, checked.digest,
                                              checked.total_bytes, staging[0], peer)
                finally:
                    await self._discard(staging)

            path = await self._single_flight(checkpoint_id, checked.digest, receive)
            if not streamed:  # cached already, or by a concurrent push: nothing to ask for
                await comm.write({"status": "done"})
            await asyncio.to_thread(self._registry.add, path, checkpoint_id, checked)
        except Exception as e:  # noqa: BLE001 - every failure goes to the pusher
            if not comm.closed():
                await comm.write(_stream.error_reply(e))
            logger.info("push of %s from %s failed: %r", checkpoint_id, comm.peer_address, e)
            return Status.dont_reply
        return {"status": "OK", "node_id": self.node_id, "path": path}

    async def _single_flight(
        self, checkpoint_id: CheckpointId, digest: str, copy: Callable[[], Awaitable[str]]
    ) -> str:
        """The cached copy, else the result of ``copy()``, run once for concurrent callers."""
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
            path = await self._copy_once_per_node(checkpoint_id, digest, copy)
        except BaseException as e:
            done.set_exception(e)
            done.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        else:
            done.set_result(path)
            return path
        finally:
            del self._in_flight[key]

    async def _copy_once_per_node(
        self, checkpoint_id: CheckpointId, digest: str, copy: Callable[[], Awaitable[str]]
    ) -> str:
        """``copy()``, unless another worker process of this node cached it meanwhile.

        Several workers of one node (``dask worker --nworkers N``) share its cache: the
        cache's transfer lock lets one of them copy while the others wait, then find it.
        """
        lock = self._cache.transfer_lock(checkpoint_id)
        await asyncio.to_thread(lock.__enter__)  # blocks while another process copies
        try:
            cached = await asyncio.to_thread(self._cache.lookup, checkpoint_id, digest)
            if cached is not None:
                self._count(cache_hits=1)
                return cached
            self._count(cache_misses=1)
            return await copy()
        finally:
            await asyncio.to_thread(lock.__exit__, None, None, None)

    async def fetch_uri(
        self, uri: str, checkpoint_id: CheckpointId, digest: str, size: int
    ) -> str:
        """Download the checkpoint persisted at ``uri`` into this node's cache.

        Like :meth:`fetch`: a cached copy is used as it is, and one download serves
        every concurrent caller on the node. ``size`` is what the reference says, for
        making room; the download is counted in ``bytes_received``.
        """

        async def download() -> str:
            staging: list[str] = []
            try:
                target = await self._prepare(checkpoint_id, size, staging)
                await asyncio.to_thread(download_into, uri, target)
                return await self._commit(checkpoint_id, digest, size, staging[0], uri)
            finally:
                await self._discard(staging)

        return await self._single_flight(checkpoint_id, digest, download)

    async def _prepare(self, checkpoint_id: CheckpointId, size: int, staging: list[str]) -> str:
        """Room in the cache and a staging directory (appended to ``staging``); the target."""
        await asyncio.to_thread(self._cache.reserve, size)
        # The received directory is renamed into ``target``, and the cache renames that
        # into place: both stay inside the cache's filesystem.
        staging.append(await asyncio.to_thread(self._cache.staging_directory, checkpoint_id))
        return os.path.join(staging[0], "data")

    async def _commit(
        self, checkpoint_id: CheckpointId, digest: str, size: int, staging: str, peer: str
    ) -> str:
        path = await asyncio.to_thread(
            self._cache.add, checkpoint_id, digest, os.path.join(staging, "data"), size
        )
        self._count(bytes_received=size, transfers=1)
        logger.debug("received %s (%d bytes) from %s", checkpoint_id, size, peer)
        return path

    def _pool(self) -> ConnectionPool:
        if self._rpc is None:
            raise RuntimeError("this NodeStore is not attached to a worker (NodeStore.attach)")
        return self._rpc

    @staticmethod
    async def _discard(staging: list[str]) -> None:
        for path in staging:
            await asyncio.to_thread(shutil.rmtree, path, True)

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


def download_into(uri: str, target: str) -> None:
    """``uri``'s checkpoint into ``target``, which appears only once complete (thread)."""
    with atomic_directory(target) as partial:
        storage.download_directory(uri, partial)


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
