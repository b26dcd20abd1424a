"""``NodeStore``: the actor on every worker that serves checkpoints and materializes them.

One store per Dask worker, created by :class:`~dckpt.cluster._worker_plugin.NodeStorePlugin`
and reachable by anyone as an actor proxy (:func:`store_of`); and one *server-less*
store in every other process that uses node references (the driver: :func:`driver_store`),
which runs the same code with its own cache folder and no server.

A store does two jobs:

- **Serve** what its node holds: the directories registered with it (kept in an index
  on the node's disk, :mod:`dckpt.cluster._served`, so a restarted worker serves them
  again) and the complete copies in its node's cache, so that a node that received a
  checkpoint serves it on. Bytes move over the worker's own server, not through actor
  calls (:mod:`dckpt.cluster._stream`): :meth:`NodeStore.serve_pull` is the handler
  ``dckpt_pull``, :meth:`NodeStore.accept_push` (handler ``dckpt_push``) takes a
  checkpoint that the driver sends.
- **Materialize** a node reference on this node, end to end, in one call
  (:meth:`NodeStore.open`): pin the checkpoint in this node's cache, find it in place
  or in the cache, else copy it in once per node (single flight within the process,
  the cache's transfer lock across the node's processes) from the first source that
  works — every holder the registry names, then each URI — into one staging directory
  of the cache, commit it there by a rename, and unpin when the caller is done. The
  order is in :meth:`NodeStore.materialize`.

Checkpoint ids are ids of content: whoever serves an id serves the same bytes, and the
receiver checks every file against its hash.

Registration is deliberately not an actor method: anything reachable through the proxy
can be called from any process, and letting a remote caller register ``/etc`` would make
"serves only registered directories" meaningless. Code on the worker registers through
:func:`register_directory`.

The materialization path after the in-place steps (cache, single flight, sources,
staging, commit) is :mod:`dckpt.cluster._materialize`, a base class of the store; the
sources it copies from are :mod:`dckpt.cluster._copy_sources`. This module keeps the
actor itself (its handlers and the methods a proxy calls) and how code finds a store:
:func:`store_of`, :func:`local_store`, :func:`this_process_store`, :func:`driver_store`.

Everything async runs on the event loop of the store's worker (or of the driver's
client); file reads, decoding and writes go to threads.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from typing import Any

from distributed import Client, get_worker
from distributed.actor import Actor
from distributed.comm import Comm
from distributed.core import Status
from distributed.utils import sync
from distributed.worker import Worker
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt import _compat, _config, _node, _transfer
from dckpt._locks import is_alive
from dckpt.cluster import _stream
from dckpt.cluster._cache import CheckpointId, NodeCache
from dckpt.cluster._copy_sources import Comms, FromPusher
from dckpt.cluster._core import NodeRef
from dckpt.cluster._holders import Holder
from dckpt.cluster._materialize import Materializer, Request, in_place
from dckpt.cluster._relay import RelaySource
from dckpt.cluster._served import Registration, ServedDirectories

logger = logging.getLogger(__name__)

#: The key of every worker's store among the worker's actors.
STORE_KEY = "dckpt-node-store"


class NodeStore(Materializer):
    """Serves what this node holds and materializes node references on it.

    Counters (:meth:`stats`), one set per store: ``bytes_sent``, ``chunks_sent``,
    ``bytes_received`` (file bytes that came from another node or a URI, as the files
    hold them, before compression; not the manifest), ``bytes_reused`` (file bytes of
    a checkpoint copied in that did not cross the wire: files this node's cache held
    already, hard-linked (copied where the mode differs), and repeats of a file within
    the checkpoint; an incremental checkpoint moves only its new files),
    ``transfers`` (checkpoints copied in), ``cache_hits`` and ``cache_misses``. Every
    request to materialize a checkpoint that is not usable in place counts once: a
    *hit* when this node's cache had it (also when the request waited for another
    request's transfer, or another process of the node copied it), a *miss* when the
    request copied it in. The cache keeps only its own figures (size, entries, pins,
    evictions).

    ``address`` is the worker's, or None for a server-less store (the driver's).
    ``cache_root`` and ``served_root`` default to the node's cache folder and
    ``<node root>/served``; call :meth:`restore` once at start to serve again what a
    previous worker of the node registered.
    """

    node_id: str
    address: str | None
    _registry: ServedDirectories
    _serving: int  # pulls being served now (event loop only)
    _comms: Comms | None
    _loop: Any  # the worker's IOLoop once attached
    # The copy-in path's state (_cache, the counters, single flight, relays) is
    # declared in Materializer, which uses it.

    def __init__(
        self, address: str | None, cache_root: str | None = None,
        served_root: str | None = None,
    ) -> None:
        self.node_id = _node.node_id()
        self.address = address
        self._registry = ServedDirectories(
            served_root if served_root is not None else os.path.join(_node.node_root(), "served")
        )
        self._serving = 0
        self._cache = NodeCache(cache_root)
        self._counters = collections.Counter()
        self._counter_lock = threading.Lock()
        self._in_flight = {}
        self._relays = {}
        self._obtaining = {}
        self._comms = None
        self._loop = None

    def attach(self, worker: Worker) -> None:
        """Serve ``dckpt_pull`` and ``dckpt_push`` on ``worker``'s server; use its comms."""
        worker.handlers[_stream.PULL_OP] = self.serve_pull
        worker.handlers[_stream.PUSH_OP] = self.accept_push
        self._comms = Comms(worker.rpc, worker.scheduler)
        self._loop = worker.loop

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
        while it is sent), else a copy this store is receiving now, served on chunk by
        chunk as it arrives (a link of a broadcast, :mod:`dckpt.cluster._relay`).
        Anything else is refused (``kind: refused``), whatever path or id is asked for.
        """
        pinned = False
        self._serving += 1
        try:
            try:
                source: _transfer.ChunkSource | RelaySource
                try:
                    # Directory checks, maybe an index write or a manifest: not on the loop.
                    path, manifest, pinned = await asyncio.to_thread(self._source_of,
                                                                     checkpoint_id)
                    source = _transfer.ChunkSource(path, manifest, chunk_bytes)
                except PermissionError:
                    relay = await self._relay_for(checkpoint_id)
                    if relay is None:
                        raise
                    # Pinned: once committed, the copy is a cache entry being read.
                    await asyncio.to_thread(self._cache.pin, checkpoint_id)
                    pinned = True
                    manifest, source = relay.manifest, RelaySource(relay, chunk_bytes)
            except Exception as e:  # noqa: BLE001 - every refusal goes to the receiver
                await comm.write(_stream.error_reply(e))
                return Status.dont_reply
            with source:
                await comm.write({"status": "OK", "manifest": manifest.to_dict()})
                await _stream.serve_chunks(comm, source, sent=self._sent)
            return Status.dont_reply
        finally:
            self._serving -= 1
            if pinned:
                await asyncio.to_thread(self._cache.unpin, checkpoint_id)

    def _source_of(self, checkpoint_id: CheckpointId) -> tuple[str, _transfer.Manifest, bool]:
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

    def _open_cached(self, checkpoint_id: CheckpointId) -> tuple[str, _transfer.Manifest] | None:
        """The cached copy of ``checkpoint_id``, pinned, and its manifest; or None (thread).

        Its files' hashes were remembered as they were received: building the
        manifest reads nothing, unless this process restarted since.
        """
        self._cache.pin(checkpoint_id)
        try:
            for entry in self._cache.entries():
                if entry.checkpoint_id == checkpoint_id and os.path.isdir(entry.path):
                    manifest = _transfer.build_manifest(entry.path)
                    if manifest.content_id == checkpoint_id:
                        return entry.path, manifest
        except BaseException:
            self._cache.unpin(checkpoint_id)
            raise
        self._cache.unpin(checkpoint_id)
        return None

    def _sent(self, length: int) -> None:
        """Count a chunk sent."""
        with self._counter_lock:
            self._counters.update(bytes_sent=length, chunks_sent=1)

    # ------------------------------------------------------------- materializing

    @contextlib.contextmanager
    def open(
        self, ref: NodeRef, found: str | None = None, callback: Callback = DEFAULT_CALLBACK
    ) -> Iterator[str]:
        """A local directory with the data of ``ref``, kept from eviction for the block.

        Call it from a task thread (or any thread but the store's event loop). The
        checkpoint is pinned in this node's cache first, so that nothing evicts it
        between finding it and leaving the block; then ``found`` (where this process
        found it before) is used while it exists, else :meth:`materialize` runs on the
        store's event loop — a worker's, or for a server-less store the current
        synchronous client's (none: a loop of its own, and no holder can be reached).
        A copy this call makes (not one it waits for) is reported to a child of
        ``callback`` branched as ``(repr(ref), cache folder)``.
        """
        run, comms = self._runner()
        with self._cache.pinned(ref.checkpoint_id):
            if found is None or not os.path.isdir(found):
                found = run(self.materialize, ref, comms, callback)
            yield found

    async def materialize(
        self, ref: NodeRef, comms: Comms | None = None, callback: Callback = DEFAULT_CALLBACK
    ) -> str:
        """A local directory with the data of ``ref``, found in this order (event loop).

        1. the same node, where the path still exists: used as it is, no copy;
        2. a path under ``dckpt.shared-paths`` that exists here, or a path that shows
           here the very files the origin fingerprinted (a shared disk found, not
           configured: :mod:`dckpt.cluster._shared`): used as it is;
        3. a directory this store serves with the same content (the same id), used as
           it is; else this node's cache, holding that checkpoint id;
        4. every holder the scheduler's registry names (``dckpt_holders``, ordered by
           :func:`~dckpt.cluster._holders.order_holders`): nodes with a cached copy
           that are not serving many transfers already, then the origin node at the
           worker it has *now*, then busy holders; without a registry, the store at
           the reference's address;
        5. each URI the reference carries;
        6. otherwise :class:`~dckpt.errors.CheckpointUnavailableError`, listing every
           step and every holder tried, and why each failed.

        Steps 4 and 5 copy into this node's cache, once per node however many ask.
        A failure there moves on to the next source only when another source could do
        better (:func:`~dckpt.cluster._failures.fixable_elsewhere`); what no other
        source can fix (this node's cache too small or its disk full, an unsafe
        manifest, a programming error) is raised at once, naming this node.
        ``comms``: the store's own when None. ``callback`` as in :meth:`open`.
        """
        tried: list[str] = []
        path = await asyncio.to_thread(in_place, ref, self.node_id, tried)
        if path is None:
            path = await self.served(ref.checkpoint_id)
        if path is None:
            request = Request.of(ref, tried)
            request.callback = callback
            path = await self._obtain(request, comms or self._comms)
        return path

    async def fetch(
        self, holder_address: str, checkpoint_id: CheckpointId, digest: str,
        holder_node: str | None = None,
    ) -> str:
        """Copy a checkpoint from the store at ``holder_address`` into this node's cache.

        ``holder_address`` is any store that holds it (its origin, or a node that has
        it cached); ``digest`` is the content digest its manifest must have, and the
        copy's files are checked against their hashes as they are written. Returns the
        local path. It is :meth:`materialize` with that one source: a cached copy is
        used as it is, concurrent calls wait for a single transfer, and the holder's
        error is raised as it is. ``holder_node``, if known, names it in messages.
        """
        holder = Holder(holder_address, holder_node or "a node not named", "given")
        request = Request(checkpoint_id, digest, f"from {holder.describe()}", holders=(holder,))
        return await self._obtain(request, self._comms)

    def evict(self, checkpoint_id: CheckpointId) -> bool:
        """Remove this node's cached copy of ``checkpoint_id`` unless it is in use."""
        return self._cache.evict(checkpoint_id)

    async def served(self, checkpoint_id: CheckpointId) -> str | None:
        """The directory registered here under ``checkpoint_id`` if it still has that
        content (checked from ``stat`` calls, hashing only files written since), or None.
        """
        registration = self._registry.find(checkpoint_id)
        if registration is None:
            return None

        def unchanged() -> bool:
            try:
                return _transfer.build_manifest(registration.path).content_id == checkpoint_id
            except OSError:
                return False

        return registration.path if await asyncio.to_thread(unchanged) else None

    def _runner(self) -> tuple[Callable[..., Any], Comms | None]:
        """How :meth:`open` runs a coroutine function here, and the comms it has."""
        if self._loop is not None:
            return functools.partial(sync, self._loop), self._comms
        client = _current_sync_client()
        if client is not None:
            return client.sync, Comms(client.rpc, client.scheduler)
        return _run_in_a_loop_of_its_own, None

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
            checked = _transfer.Manifest.from_dict(manifest)
            if checked.content_id != checkpoint_id:
                raise ValueError(f"checkpoint id {checkpoint_id!r} is not the id of the "
                                 f"content pushed ({checked.content_id})")
            pusher = FromPusher(comm, peer, checked, _transfer.check_chunk_bytes(chunk_bytes))
            request = Request(checkpoint_id, checked.digest, f"from {peer}", holders=())
            request.pushed = pusher
            path = await self._obtain(request, self._comms)
            if not pusher.streamed:  # cached already, or by a concurrent push
                await comm.write({"status": "done"})
            await asyncio.to_thread(self._registry.add, path, (), checked)
        except Exception as e:  # noqa: BLE001 - every failure goes to the pusher
            if not comm.closed():
                await comm.write(_stream.error_reply(e))
            logger.info("push of %s from %s failed: %r", checkpoint_id, comm.peer_address, e)
            return Status.dont_reply
        return {"status": "OK", "node_id": self.node_id, "path": path}

    # ------------------------------------------------------------------ both

    def holdings(self) -> dict[str, Any]:
        """A snapshot of what this node holds.

        ``{"origin": {id: bytes}, "cached": {id: bytes}, "uris": {id: [uri, ...]},
        "restored": [id, ...], "pinned": [id, ...], "serving": n, "obtaining": [id,
        ...]}``: ``origin`` are the directories registered here, ``cached`` the copies
        in this node's cache, ``uris`` where registered ones are known to be persisted,
        ``restored`` those served again after a restart, ``pinned`` the cached ones
        this store keeps from eviction now (in use), ``serving`` the pulls being served
        now, ``obtaining`` the checkpoints it is copying in (broadcast: the registry
        keeps naming it to readers while it does). Sent whole (not as changes), so a
        lost message costs nothing.
        """
        registrations = self._registry.all()
        entries = self._cache.entries()
        return {
            "origin": {r.checkpoint_id: r.manifest.total_bytes for r in registrations},
            "cached": {e.checkpoint_id: e.size for e in entries},
            "pinned": sorted({e.checkpoint_id for e in entries if e.pins}),
            "uris": {r.checkpoint_id: list(r.uris) for r in registrations if r.uris},
            "restored": sorted(r.checkpoint_id for r in registrations if r.restored),
            "serving": self._serving,
            "obtaining": sorted(self._obtaining),
        }

    def stats(self) -> dict[str, Any]:
        """This store's counters and its cache's figures (``cache``: its ``root``, its
        budget ``max_bytes`` and :meth:`NodeCache.stats`)."""
        with self._counter_lock:
            counters = dict(self._counters)
        return {
            "node_id": self.node_id,
            "address": self.address,
            "registered": len(self._registry.ids()),
            **{name: counters.get(name, 0) for name in _COUNTERS},
            "cache": {"root": self._cache.root, "max_bytes": self._cache.max_bytes,
                      **self._cache.stats()},
        }



_COUNTERS = ("bytes_sent", "bytes_received", "bytes_reused", "transfers", "chunks_sent",
             "cache_hits", "cache_misses")


def store_of(worker_address: str, client: Client | None = None) -> Actor:
    """An actor proxy for the store of the worker at ``worker_address``.

    On a worker the proxy uses that worker's connections; elsewhere it uses
    ``client``, or the default client when none is given.
    """
    return _compat.actor_proxy(NodeStore, worker_address, STORE_KEY, client)


def local_store(worker: Worker | None = None) -> NodeStore:
    """The store of this worker (the object itself, not a proxy)."""
    worker = worker or get_worker()
    store = _compat.actor_instance(worker, STORE_KEY)
    if not isinstance(store, NodeStore):
        raise RuntimeError(  # noqa: TRY004 - no store installed, not a wrong argument
            f"worker {worker.address} has no dckpt NodeStore; install it with "
            "dckpt.cluster.install(client) or the scheduler preload"
        )
    return store


def this_process_store() -> NodeStore:
    """The store that materializes references in this process.

    The worker's store on a worker that has one; otherwise (the driver, a worker
    without dckpt) the process's server-less store (:func:`driver_store`).
    """
    worker = _compat.process_worker()
    store = _compat.actor_instance(worker, STORE_KEY) if worker is not None else None
    return store if isinstance(store, NodeStore) else driver_store()


def driver_store() -> NodeStore:
    """This process's server-less store: the same code as a worker's, serving no one.

    Its cache is a folder of its own, ``<dckpt.temporary-directory>/dckpt-fetched/<pid>/``,
    within ``dckpt.cache.max-bytes`` like a node's (a copy in use is pinned; one
    evicted since is fetched again at its next use). The folder goes when the process
    exits, and folders that dead processes left go when the next process makes its
    own. Keyed by pid as well, so a forked child neither shares nor removes its
    parent's folder.
    """
    base = os.path.join(_config.temporary_directory(), "dckpt-fetched")
    return _driver_store(base, os.getpid())


@functools.cache
def _driver_store(base: str, pid: int) -> NodeStore:
    os.makedirs(base, exist_ok=True)
    for name in os.listdir(base):
        if name.isdigit() and int(name) != pid and not is_alive(int(name)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    root = os.path.join(base, str(pid))
    os.makedirs(root, exist_ok=True)
    atexit.register(_remove_if_mine, root, pid)
    return NodeStore(None, cache_root=os.path.join(root, "cache"),
                     served_root=os.path.join(root, "served"))


def _remove_if_mine(root: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child, which inherits the atexit hook
        shutil.rmtree(root, ignore_errors=True)


def register_directory(
    path: str, worker: Worker | None = None, uris: tuple[str, ...] = ()
) -> Registration:
    """Let this worker's store serve ``path`` under the id of its content (local code only).

    ``uris`` are where it is known to be persisted (shown by the registry). Hashes
    the files not hashed before (:func:`dckpt._transfer.build_manifest`).
    """
    return local_store(worker)._registry.add(path, tuple(uris))


def forget_here(store: NodeStore, ref: NodeRef) -> dict[str, bool]:
    """Stop serving ``ref`` and delete its directory if this is its origin; evict copies.

    Only a registration of ``ref.path`` on ``ref``'s own node is deleted: a registration
    of another directory under that id (the same content elsewhere, a pushed copy) stays
    served and is not ours to delete. Blocking file work: call it in a thread.
    """
    removed = False
    registration = store._registry.find(ref.checkpoint_id)
    if registration is not None:
        if store.node_id == ref.node_id and registration.path == os.path.realpath(ref.path):
            store._registry.remove(ref.checkpoint_id)
            shutil.rmtree(registration.path, ignore_errors=True)
            removed = not os.path.exists(registration.path)
        else:
            logger.debug("not deleting %s: %r names %s", registration.path, ref, ref.path)
    return {"removed": removed, "evicted": store._cache.evict(ref.checkpoint_id)}


def stats(client: Client) -> dict[str, dict[str, Any]]:
    """The counters of every worker's store, by worker address."""
    result: dict[str, dict[str, Any]] = client.run(_local_stats)
    return result


def _local_stats(dask_worker: Worker) -> dict[str, Any]:
    return local_store(dask_worker).stats()


# ------------------------------------------------------------------ helpers


def _current_sync_client() -> Client | None:
    """The current client if this thread may wait on it (synchronous, not its loop)."""
    try:
        client = Client.current(allow_global=True)
    except ValueError:
        return None
    if client.asynchronous:
        return None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return client
    return None  # on an event loop: client.sync cannot wait here


def _run_in_a_loop_of_its_own(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` awaited on a fresh event loop, in a thread of its own (so
    also from code that runs on a loop)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dckpt-resolve") as pool:
        return pool.submit(asyncio.run, function(*args)).result()
