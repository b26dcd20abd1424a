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

It serves what it holds: the directories registered with it (kept in an index on the
node's disk, :mod:`dckpt.cluster._served`, so a restarted worker serves them again)
and the complete copies in its node's cache, so that a node that received a checkpoint
serves it on. Checkpoint ids are ids of content: whoever serves an id serves the same
bytes, and the receiver checks every file against its hash.

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
from typing import Any

from distributed import Client, get_worker
from distributed.actor import Actor
from distributed.comm import Comm
from distributed.core import ConnectionPool, Status
from distributed.worker import Worker

from dckpt import node, storage, transfer
from dckpt.cluster import _stream
from dckpt.cluster._cache import CheckpointId, NodeCache
from dckpt.cluster._served import Registration, ServedDirectories
from dckpt.formats._atomic import atomic_directory

logger = logging.getLogger(__name__)

#: The key of every worker's store in ``worker.state.actors``.
STORE_KEY = "dckpt-node-store"


class NodeStore:
    """Serves registered directories and keeps this node's cache of others' checkpoints.

    Counters (:meth:`stats`): ``bytes_sent``, ``bytes_received``, ``transfers``
    (checkpoints received), ``chunks_sent``, ``cache_hits``, ``cache_misses`` and the
    cache's own figures.

    ``served_root`` is the folder of the index of registered directories (default
    ``<node root>/served``); call :meth:`restore` once at start to serve again what a
    previous worker of the node registered.
    """

    node_id: str
    address: str
    _registry: ServedDirectories
    _serving: int  # pulls being served now (event loop only)
    _cache: NodeCache
    _counters: collections.Counter[str]
    _counter_lock: threading.Lock
    _in_flight: dict[tuple[CheckpointId, str], asyncio.Future[str]]
    _corrupt_next_chunks: int
    _rpc: ConnectionPool | None

    def __init__(
        self, address: str, cache_root: str | None = None, served_root: str | None = None
    ) -> None:
        self.node_id = node.node_id()
        self.address = address
        self._registry = ServedDirectories(
            served_root if served_root is not None else os.path.join(node.node_root(), "served")
        )
        self._serving = 0
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

    async def restore(self) -> int:
        """Serve again the directories of the node's index that are still there.

        Hashes their files (a restarted process remembers no hash), in a thread.
        Returns how many.
        """
        return len(await asyncio.to_thread(self._registry.restore))

    # ---------------------------------------------------------------- owner side

    def manifest(self, checkpoint_id: CheckpointId) -> dict[str, Any]:
        """The manifest of a registered checkpoint, as plain data."""
        return self._registry.get(checkpoint_id).manifest.to_dict()

    async def serve_pull(
        self, comm: Comm, checkpoint_id: CheckpointId, chunk_bytes: int
    ) -> Status:
        """Handler ``dckpt_pull``: send a checkpoint this node holds to whoever asks.

        A directory registered here, else a complete copy in this node's cache (pinned
        while it is sent). Anything else is refused (``kind: refused``), whatever path
        or id is asked for.
        """
        pinned = False
        self._serving += 1
        try:
            try:
                # Directory checks, maybe an index write or a manifest: not on the loop.
                path, manifest, pinned = await asyncio.to_thread(self._source_of, checkpoint_id)
                source = transfer.ChunkSource(path, manifest, chunk_bytes)
            except Exception as e:  # noqa: BLE001 - every refusal goes to the receiver
                await comm.write(_stream.error_reply(e))
                return Status.dont_reply
            with source:
                await comm.write({"status": "OK", "manifest": manifest.to_dict()})
                await _stream.serve_chunks(comm, source, on_chunk=self._sent)
            return Status.dont_reply
        finally:
            self._serving -= 1
            if pinned:
                await asyncio.to_thread(self._cache.unpin, checkpoint_id)

    def _source_of(self, checkpoint_id: CheckpointId) -> tuple[str, transfer.Manifest, bool]:
        """What to send for ``checkpoint_id``: path, manifest, whether it is a pinned
        cache entry; raises the refusal if this node has nothing of it (thread)."""
        registration = self._registry.find(checkpoint_id)
        if registration is not None:
            return registration.path, registration.manifest, False
        found = self._open_cached(checkpoint_id)
        if found is None:
            registration = self._registry.get(checkpoint_id)  # raises why not (or was just added)
            return registration.path, registration.manifest, False
        return found[0], found[1], True

    def _open_cached(self, checkpoint_id: CheckpointId) -> tuple[str, transfer.Manifest] | None:
        """The cached copy of ``checkpoint_id``, pinned, and its manifest; or None (thread).

        Its files' hashes were remembered as they were received: building the
        manifest reads nothing, unless this process restarted since.
        """
        self._cache.pin(checkpoint_id)
        try:
            for entry in self._cache.entries():
                if entry.checkpoint_id == checkpoint_id and os.path.isdir(entry.path):
                    manifest = transfer.build_manifest(entry.path)
                    if manifest.content_id == checkpoint_id:
                        return entry.path, manifest
        except BaseException:
            self._cache.unpin(checkpoint_id)
            raise
        self._cache.unpin(checkpoint_id)
        return None

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

    async def served(self, checkpoint_id: CheckpointId) -> str | None:
        """The directory registered here under ``checkpoint_id`` if it still has that
        content (checked from ``stat`` calls, hashing only files written since), or None.
        """
        registration = self._registry.find(checkpoint_id)
        if registration is None:
            return None

        def unchanged() -> bool:
            try:
                return transfer.build_manifest(registration.path).content_id == checkpoint_id
            except OSError:
                return False

        return registration.path if await asyncio.to_thread(unchanged) else None

    async def cached(self, checkpoint_id: CheckpointId, digest: str) -> str | None:
        """The path of this node's cached copy of the checkpoint, or None (a miss)."""
        path = await asyncio.to_thread(self._cache.lookup, checkpoint_id, digest)
        self._count(**({"cache_hits": 1} if path is not None else {}))
        return path

    async def fetch(
        self, owner_address: str, checkpoint_id: CheckpointId, digest: str,
        owner_node: str | None = None,
    ) -> str:
        """Copy a checkpoint from the store at ``owner_address`` into this node's cache.

        ``owner_address`` is any store that holds it (its origin, or a node that has
        it cached); ``digest`` is the content digest its manifest must have, and the
        copy's files are checked against their hashes as they are written. Returns the
        local path. A cached copy is used as it is; concurrent calls for one checkpoint
        wait for a single transfer. ``owner_node``, if known, names the holder in error
        messages.
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
            if checked.content_id != checkpoint_id:
                raise ValueError(f"checkpoint id {checkpoint_id!r} is not the id of the "
                                 f"content pushed ({checked.content_id})")
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
            await asyncio.to_thread(self._registry.add, path, (), checked)
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

    def holdings(self) -> dict[str, Any]:
        """A snapshot of what this node holds.

        ``{"origin": {id: bytes}, "cached": {id: bytes}, "uris": {id: [uri, ...]},
        "restored": [id, ...], "serving": n}``: ``origin`` are the directories
        registered here, ``cached`` the copies in this node's cache, ``uris`` where
        registered ones are known to be persisted, ``restored`` those served again
        after a restart, ``serving`` the pulls being served now. Sent whole (not as
        changes), so a lost message costs nothing.
        """
        registrations = self._registry.all()
        return {
            "origin": {r.checkpoint_id: r.manifest.total_bytes for r in registrations},
            "cached": {e.checkpoint_id: e.size for e in self._cache.entries()},
            "uris": {r.checkpoint_id: list(r.uris) for r in registrations if r.uris},
            "restored": sorted(r.checkpoint_id for r in registrations if r.restored),
            "serving": self._serving,
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


def register_directory(
    path: str, worker: Worker | None = None, uris: tuple[str, ...] = ()
) -> Registration:
    """Let this worker's store serve ``path`` under the id of its content (local code only).

    ``uris`` are where it is known to be persisted (shown by the registry). Hashes
    the files not hashed before (:func:`dckpt.transfer.build_manifest`).
    """
    return local_store(worker)._registry.add(path, tuple(uris))


def stats(client: Client) -> dict[str, dict[str, Any]]:
    """The counters of every worker's store, by worker address."""
    result: dict[str, dict[str, Any]] = client.run(_local_stats)
    return result


def _local_stats(dask_worker: Worker) -> dict[str, Any]:
    return local_store(dask_worker).stats()
