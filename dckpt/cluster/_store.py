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

Everything async runs on the event loop of the store's worker (or of the driver's
client); file reads, decoding and writes go to threads.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import dask.config
from dask.utils import parse_timedelta
from distributed import Client, get_worker
from distributed.actor import Actor
from distributed.comm import Comm
from distributed.core import ConnectionPool, Status
from distributed.utils import sync
from distributed.worker import Worker
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt import _compat, _config, _node, _storage, _transfer
from dckpt._locks import is_alive
from dckpt.cluster import _shared, _stream
from dckpt.cluster._cache import CheckpointId, NodeCache, SharedFiles
from dckpt.cluster._core import NodeRef
from dckpt.cluster._failures import describe, raise_unless_fixable_elsewhere
from dckpt.cluster._holders import Holder, order_holders
from dckpt.cluster._relay import Relay, RelaySource
from dckpt.cluster._served import Registration, ServedDirectories
from dckpt.errors import CheckpointUnavailableError

logger = logging.getLogger(__name__)

#: The key of every worker's store among the worker's actors.
STORE_KEY = "dckpt-node-store"


@dataclasses.dataclass(frozen=True)
class Comms:
    """How a store reaches the others: a pool of comms to stores, an rpc to the scheduler.

    A worker's own (``worker.rpc``, ``worker.scheduler``) for its store; the client's for
    the driver's. ``scheduler`` is None where there is no registry to ask.
    """

    pool: ConnectionPool
    scheduler: Any = None


class NodeStore:
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
    _cache: NodeCache
    _counters: collections.Counter[str]
    _counter_lock: threading.Lock
    # Single flight, per event loop: futures belong to one loop (a driver may use several).
    _in_flight: dict[tuple[int, CheckpointId], asyncio.Future[str]]
    # Broadcast (:mod:`dckpt.cluster._relay`): transfers in progress that readers
    # downstream may pull from, and checkpoints this store is about to copy in (set
    # once a relay exists or the copy ended), so that a reader the registry sent here
    # a moment early waits instead of being refused.
    _relays: dict[CheckpointId, Relay]
    _obtaining: dict[CheckpointId, asyncio.Event]
    _comms: Comms | None
    _loop: Any  # the worker's IOLoop once attached

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
        path = await asyncio.to_thread(_in_place, ref, self.node_id, tried)
        if path is None:
            path = await self.served(ref.checkpoint_id)
        if path is None:
            request = _Request.of(ref, tried)
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
        request = _Request(checkpoint_id, digest, f"from {holder.describe()}", holders=(holder,))
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

    async def _obtain(self, request: _Request, comms: Comms | None) -> str:
        """Step 3 (the cache) and, on a miss, steps 4-6, once per node."""
        loop = asyncio.get_running_loop()
        key = (id(loop), request.checkpoint_id)
        waiting = self._in_flight.get(key)
        if waiting is not None:
            path = await asyncio.shield(waiting)
            self._count(cache_hits=1)
            return path
        done: asyncio.Future[str] = loop.create_future()
        self._in_flight[key] = done
        try:
            path = await self._obtain_once_per_node(request, comms)
        except BaseException as e:
            done.set_exception(e)
            done.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        else:
            done.set_result(path)
            return path
        finally:
            del self._in_flight[key]

    async def _obtain_once_per_node(self, request: _Request, comms: Comms | None) -> str:
        """The cached copy, else a copy in, unless another process of the node makes it.

        Several workers of one node (``dask worker --nworkers N``) share its cache: the
        cache's transfer lock lets one of them copy while the others wait, then find it.
        """
        cache = self._cache
        path = await asyncio.to_thread(cache.lookup, request.checkpoint_id, request.digest)
        if path is None:
            lock = cache.transfer_lock(request.checkpoint_id)
            await asyncio.to_thread(lock.__enter__)  # blocks while another process copies
            try:
                path = await asyncio.to_thread(cache.lookup, request.checkpoint_id,
                                               request.digest)
                if path is None:
                    self._count(cache_misses=1)
                    self._obtaining[request.checkpoint_id] = asyncio.Event()
                    try:
                        return await self._copy_in(request, await self._sources(request, comms))
                    finally:
                        self._obtaining.pop(request.checkpoint_id).set()
            finally:
                await asyncio.to_thread(lock.__exit__, None, None, None)
        self._count(cache_hits=1)
        return path

    async def _sources(self, request: _Request, comms: Comms | None) -> list[_Source]:
        """Steps 4 and 5: the holders to pull from, then the URIs to download."""
        if request.pushed is not None:
            return [request.pushed]
        holders = request.holders
        ref = request.ref
        if holders is None:
            assert ref is not None
            request.tried.append(f"this node's cache: no copy of {ref.checkpoint_id}")
            if comms is None:
                request.tried.append("holders: no Dask client in this process to reach them")
                holders = ()
            else:
                # Broadcast: say who asks, so that later readers pull from this store.
                asker = self.address if dask.config.get("dckpt.transfer.broadcast") else None
                answer = await _ask_registry(ref, comms, asker, self.node_id)
                ordered, notes = order_holders(answer, ref, self.node_id)
                request.tried.extend(notes)
                holders = tuple(ordered)
        sources: list[_Source] = []
        if holders and comms is not None:
            sources += [_FromHolder(comms.pool, h, request.checkpoint_id, request.digest)
                        for h in holders]
        if ref is not None:
            sources += [_FromUri(uri, ref.size) for uri in ref.uris]
            if not ref.uris:
                request.tried.append("uri: the reference carries none (persist it with to_uri())")
        return sources

    async def _copy_in(self, request: _Request, sources: Sequence[_Source]) -> str:
        """Copy the checkpoint from the first source that works into one staging
        directory of the cache, and commit it there.

        A request for one given source (:meth:`fetch`, a push) raises its error as it
        is; a reference's request moves on as :meth:`materialize` says.
        """
        staging: str | None = None
        try:
            for source in sources:
                relay: Relay | None = None
                shared: SharedFiles | None = None  # files of the cache to link, pinned
                try:
                    async with source.open() as incoming:
                        shared = await asyncio.to_thread(self._cache.share, incoming.manifest,
                                                         incoming.size)
                        staging = await asyncio.to_thread(self._empty_staging, staging,
                                                          request.checkpoint_id)
                        relay = self._start_relay(request.checkpoint_id, incoming, staging)
                        with request.callback.branched(
                                request.what_repr, self._cache.root) as progress:
                            fetched = await incoming.receive_into(
                                staging, shared.have,
                                on_written=None if relay is None else relay.written,
                                callback=progress)
                    if relay is not None:
                        relay.moving()  # its readers must not open files mid-rename
                    path = await asyncio.to_thread(self._cache.add, request.checkpoint_id,
                                                   request.digest, staging, incoming.size)
                    if relay is not None:
                        relay.moved(path)
                except Exception as e:
                    if relay is not None:
                        relay.fail(e)  # its readers go on to their next holder
                        self._relays.pop(request.checkpoint_id, None)
                    if request.ref is None:
                        raise
                    raise_unless_fixable_elsewhere(e, request.ref, self.node_id,
                                                   source.describe())
                    request.tried.append(f"{source.describe()}: {describe(e)}")
                    continue
                finally:
                    if shared is not None:
                        await asyncio.to_thread(shared.release)
                self._count(bytes_received=fetched, bytes_reused=incoming.size - fetched,
                            transfers=1)
                logger.debug("received %s (%d bytes, %d of them from this node's cache) "
                             "from %s", request.checkpoint_id, incoming.size,
                             incoming.size - fetched, source.describe())
                return path
        finally:
            self._relays.pop(request.checkpoint_id, None)
            if staging is not None:  # renamed into the cache unless a source failed
                await asyncio.to_thread(shutil.rmtree, staging, True)
        raise CheckpointUnavailableError(request.unavailable(self.node_id))

    def _start_relay(
        self, checkpoint_id: CheckpointId, incoming: _Incoming, staging: str
    ) -> Relay | None:
        """Let readers downstream pull this transfer as it arrives (event loop)."""
        manifest = getattr(incoming, "manifest", None)
        if manifest is None or self.address is None:  # a URI download; a driver
            return None
        relay = Relay(manifest, staging)
        self._relays[checkpoint_id] = relay
        waiting = self._obtaining.get(checkpoint_id)
        if waiting is not None:
            waiting.set()
        return relay

    async def _relay_for(self, checkpoint_id: CheckpointId) -> Relay | None:
        """The transfer of ``checkpoint_id`` in progress here, if any; waits a little
        for one that this store is about to start."""
        waiting = self._obtaining.get(checkpoint_id)
        if checkpoint_id not in self._relays and waiting is not None:
            timeout = parse_timedelta(dask.config.get("dckpt.transfer.connect-timeout"))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiting.wait(), timeout)
        return self._relays.get(checkpoint_id)

    def _empty_staging(self, staging: str | None, checkpoint_id: CheckpointId) -> str:
        """The request's one staging directory, emptied of a failed source's files (thread)."""
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        return self._cache.staging_directory(checkpoint_id)

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
            pusher = _FromPusher(comm, peer, checked, _transfer.check_chunk_bytes(chunk_bytes))
            request = _Request(checkpoint_id, checked.digest, f"from {peer}", holders=())
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

    def _count(self, **amounts: int) -> None:
        with self._counter_lock:
            self._counters.update(amounts)


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


def _in_place(ref: NodeRef, here: str, tried: list[str]) -> str | None:
    """Steps 1 and 2: the reference's own path, if this node sees it (thread)."""
    if ref.node_id == here:
        if os.path.isdir(ref.path):
            return ref.path
        tried.append(f"same node {here}: {ref.path} no longer exists")
    else:
        tried.append(f"same node: this is {here}, not {ref.node_id}")
    if _node.is_shared_path(ref.path):
        if os.path.isdir(ref.path):
            return ref.path
        tried.append(f"shared path: {ref.path} does not exist here")
        return None
    same, why_not = _shared.same_files(ref.path, ref.fingerprint, ref.node_id)
    if same:
        return ref.path
    tried.append(f"shared path: {ref.path} is not under dckpt.shared-paths, and {why_not}")
    return None


@dataclasses.dataclass
class _Request:
    """One checkpoint to materialize, what was tried so far, and where to ask."""

    checkpoint_id: CheckpointId
    digest: str
    what: str  # for the error message
    holders: tuple[Holder, ...] | None = None  # None: ask the registry about ``ref``
    ref: NodeRef | None = None
    tried: list[str] = dataclasses.field(default_factory=list)
    pushed: _FromPusher | None = None
    callback: Callback = DEFAULT_CALLBACK  # follows the copy in (fsspec Callback)

    @property
    def what_repr(self) -> str:
        return repr(self.ref) if self.ref is not None else f"checkpoint {self.checkpoint_id}"

    @classmethod
    def of(cls, ref: NodeRef, tried: list[str]) -> _Request:
        return cls(ref.checkpoint_id, ref.digest, f"of node {ref.node_id}", ref=ref, tried=tried)

    def unavailable(self, here: str) -> str:
        steps = "\n".join(f"  {i}. {step}" for i, step in enumerate(self.tried, 1))
        if self.ref is not None:
            what = (f"checkpoint {self.checkpoint_id} of node {self.ref.node_id} "
                    f"({self.ref.path}, {self.ref.size} bytes)")
        else:
            what = f"checkpoint {self.checkpoint_id} {self.what}"
        return f"{what} cannot be had here (node {here}). Tried:\n{steps}"


class _Incoming(Protocol):
    """A source opened: how many bytes will come, its manifest if known before they
    do, and a way to write them (the files ``have`` names need not come; returns the
    bytes that came)."""

    size: int

    @property
    def manifest(self) -> _transfer.Manifest | None: ...

    async def receive_into(
        self, directory: str, have: _transfer.Have,
        on_written: Callable[[_transfer.ChunkSpec], None] | None = None,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> int: ...


class _Source(Protocol):
    """Somewhere a checkpoint's bytes can come from (a holder, a URI, a pusher)."""

    def describe(self) -> str: ...

    def open(self) -> contextlib.AbstractAsyncContextManager[_Incoming]: ...


class _FromHolder:
    """Step 4: a pull from a holder's store."""

    def __init__(self, pool: ConnectionPool, holder: Holder, checkpoint_id: CheckpointId,
                 digest: str) -> None:
        self._pool, self._holder = pool, holder
        self._checkpoint_id, self._digest = checkpoint_id, digest

    def describe(self) -> str:
        return self._holder.describe()

    def open(self) -> contextlib.AbstractAsyncContextManager[_Incoming]:
        return _stream.pulling(self._pool, self._holder.address, self._checkpoint_id,
                               self._digest, node_id=self._holder.node_id)


class _FromUri:
    """Step 5: a download of the checkpoint persisted at a URI.

    Always a full download: what files a URI holds is known only once they are
    listed and read, so none can be placed from the cache instead (the downloaded
    entry's files are hashed when it is added, and later transfers link from them).
    """

    manifest: _transfer.Manifest | None = None

    def __init__(self, uri: str, size: int) -> None:
        self.uri, self.size = uri, size

    def describe(self) -> str:
        return f"uri {self.uri}"

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[_Incoming]:
        yield self

    async def receive_into(
        self, directory: str, have: _transfer.Have,
        on_written: Callable[[_transfer.ChunkSpec], None] | None = None,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> int:
        # The download's own callback counts files (children bytes), as to_uri's does.
        await asyncio.to_thread(_storage.download_directory, self.uri, directory,
                                callback=callback)
        return self.size


class _FromPusher:
    """A push from the driver (``dckpt_push``): the chunks come when asked for."""

    def __init__(self, comm: Comm, peer: str, manifest: _transfer.Manifest,
                 chunk_bytes: int) -> None:
        self._comm, self._peer = comm, peer
        self.manifest, self.size, self.chunk_bytes = manifest, manifest.total_bytes, chunk_bytes
        self.streamed = False  # whether the pusher was asked for chunks (and told "done")

    def describe(self) -> str:
        return self._peer

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[_Incoming]:
        yield self

    async def receive_into(
        self, directory: str, have: _transfer.Have,
        on_written: Callable[[_transfer.ChunkSpec], None] | None = None,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> int:
        self.streamed = True
        received = await _stream.stream_over(self._comm, self._peer, self.manifest, directory,
                                             chunk_bytes=self.chunk_bytes, in_place=True,
                                             have=have, on_written=on_written,
                                             callback=callback)
        return received.fetched_bytes


async def _ask_registry(
    ref: NodeRef, comms: Comms, asker: str | None, asker_node: str
) -> Mapping[str, Any] | None:
    """The registry's ``dckpt_holders`` answer, or None if there is no registry.

    ``asker``, the address of a store that will serve what it receives on (None for
    the driver's), is recorded as fetching, so that readers after it pull from it.
    """
    if comms.scheduler is None:
        return None
    timeout = parse_timedelta(dask.config.get("dckpt.transfer.connect-timeout"))
    try:
        answer = await asyncio.wait_for(
            comms.scheduler.dckpt_holders(checkpoint_id=ref.checkpoint_id,
                                          node_id=ref.node_id, address=ref.store_address,
                                          asker=asker, asker_node=asker_node),
            timeout,
        )
    except Exception as e:  # noqa: BLE001 - no registry to ask: the reference's store
        logger.info("could not ask the scheduler who holds %s (%r); trying %s",
                    ref.checkpoint_id, e, ref.store_address)
        return None
    return answer if isinstance(answer, Mapping) else None


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
