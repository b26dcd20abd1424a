"""How a :class:`~dckpt.cluster._store.NodeStore` copies a checkpoint in, once per node.

The path behind :meth:`NodeStore.materialize <dckpt.cluster._store.NodeStore.materialize>`
after the in-place steps (:func:`in_place`: the same node, a shared path): this node's
cache, else a copy in from the first :mod:`source <dckpt.cluster._copy_sources>` that
works, with single flight within the process (one future per loop and checkpoint) and
across the node's processes (the cache's transfer lock), into one staging directory of
the cache, committed there by a rename, and offered to readers downstream as it arrives
(a :class:`~dckpt.cluster._relay.Relay`, broadcast). A :class:`Request` is one
checkpoint to obtain and what was tried.

:class:`Materializer` is the part of the store that does it: a base of ``NodeStore``
holding the state of copies in progress, so that the store stays the one actor class a
proxy calls (its public methods are in ``_store.py``) while this path reads in one
place. Event-loop code; file work goes to threads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Sequence

import dask.config
from dask.utils import parse_timedelta
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt import _node
from dckpt.cluster import _shared
from dckpt.cluster._cache import CheckpointId, NodeCache, SharedFiles
from dckpt.cluster._copy_sources import (
    Comms,
    FromHolder,
    FromPusher,
    FromUri,
    Incoming,
    Source,
    ask_registry,
)
from dckpt.cluster._core import NodeRef
from dckpt.cluster._failures import describe, raise_unless_fixable_elsewhere
from dckpt.cluster._holders import Holder, order_holders
from dckpt.cluster._relay import Relay
from dckpt.errors import CheckpointUnavailableError

logger = logging.getLogger(__name__)


class Materializer:
    """The copy-in path of a node store; ``NodeStore`` sets this state in its
    ``__init__`` (see its docstring for the counters)."""

    node_id: str
    address: str | None  # None: a server-less store, whose copies no one pulls on
    _cache: NodeCache
    _comms: Comms | None
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

    async def _obtain(self, request: Request, comms: Comms | None) -> str:
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

    async def _obtain_once_per_node(self, request: Request, comms: Comms | None) -> str:
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

    async def _sources(self, request: Request, comms: Comms | None) -> list[Source]:
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
                answer = await ask_registry(ref, comms, asker, self.node_id)
                ordered, notes = order_holders(answer, ref, self.node_id)
                request.tried.extend(notes)
                holders = tuple(ordered)
        sources: list[Source] = []
        if holders and comms is not None:
            sources += [FromHolder(comms.pool, h, request.checkpoint_id, request.digest)
                        for h in holders]
        if ref is not None:
            sources += [FromUri(uri, ref.size) for uri in ref.uris]
            if not ref.uris:
                request.tried.append("uri: the reference carries none (persist it with to_uri())")
        return sources

    async def _copy_in(self, request: Request, sources: Sequence[Source]) -> str:
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
                                                   request.digest, staging, incoming.size,
                                                   incoming.manifest)
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
        self, checkpoint_id: CheckpointId, incoming: Incoming, staging: str
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

    def _count(self, **amounts: int) -> None:
        with self._counter_lock:
            self._counters.update(amounts)


def in_place(ref: NodeRef, here: str, tried: list[str]) -> str | None:
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
class Request:
    """One checkpoint to materialize, what was tried so far, and where to ask."""

    checkpoint_id: CheckpointId
    digest: str
    what: str  # for the error message
    holders: tuple[Holder, ...] | None = None  # None: ask the registry about ``ref``
    ref: NodeRef | None = None
    tried: list[str] = dataclasses.field(default_factory=list)
    pushed: FromPusher | None = None
    callback: Callback = DEFAULT_CALLBACK  # follows the copy in (fsspec Callback)

    @property
    def what_repr(self) -> str:
        return repr(self.ref) if self.ref is not None else f"checkpoint {self.checkpoint_id}"

    @classmethod
    def of(cls, ref: NodeRef, tried: list[str]) -> Request:
        return cls(ref.checkpoint_id, ref.digest, f"of node {ref.node_id}", ref=ref, tried=tried)

    def unavailable(self, here: str) -> str:
        steps = "\n".join(f"  {i}. {step}" for i, step in enumerate(self.tried, 1))
        if self.ref is not None:
            what = (f"checkpoint {self.checkpoint_id} of node {self.ref.node_id} "
                    f"({self.ref.path}, {self.ref.size} bytes)")
        else:
            what = f"checkpoint {self.checkpoint_id} {self.what}"
        return f"{what} cannot be had here (node {here}). Tried:\n{steps}"
