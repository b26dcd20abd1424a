"""Where a node's copy of a checkpoint comes from: steps 4 and 5 of materialization.

A :class:`Source` opens into an :class:`Incoming` transfer, which tells its size (and
its manifest, when known before the bytes) and writes the files into a staging
directory: :class:`FromHolder` pulls from a holder's store
(:mod:`dckpt.cluster._stream`), :class:`FromUri` downloads what was persisted at a URI,
:class:`FromPusher` takes what the driver pushes (``dckpt_push``). :func:`ask_registry`
asks the scheduler which holders to pull from, over the store's :class:`Comms`.
:mod:`dckpt.cluster._materialize` tries them in order. Event-loop code; the URI
download goes to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import dask.config
from dask.utils import parse_timedelta
from distributed.comm import Comm
from distributed.core import ConnectionPool
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt import _storage, _transfer
from dckpt.cluster import _stream
from dckpt.cluster._cache import CheckpointId
from dckpt.cluster._core import NodeRef
from dckpt.cluster._holders import Holder

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Comms:
    """How a store reaches the others: a pool of comms to stores, an rpc to the scheduler.

    A worker's own (``worker.rpc``, ``worker.scheduler``) for its store; the client's for
    the driver's. ``scheduler`` is None where there is no registry to ask.
    """

    pool: ConnectionPool
    scheduler: Any = None


class Incoming(Protocol):
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


class Source(Protocol):
    """Somewhere a checkpoint's bytes can come from (a holder, a URI, a pusher)."""

    def describe(self) -> str: ...

    def open(self) -> contextlib.AbstractAsyncContextManager[Incoming]: ...


class FromHolder:
    """Step 4: a pull from a holder's store."""

    def __init__(self, pool: ConnectionPool, holder: Holder, checkpoint_id: CheckpointId,
                 digest: str) -> None:
        self._pool, self._holder = pool, holder
        self._checkpoint_id, self._digest = checkpoint_id, digest

    def describe(self) -> str:
        return self._holder.describe()

    def open(self) -> contextlib.AbstractAsyncContextManager[Incoming]:
        return _stream.pulling(self._pool, self._holder.address, self._checkpoint_id,
                               self._digest, node_id=self._holder.node_id)


class FromUri:
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

    def open(self) -> contextlib.AbstractAsyncContextManager[Incoming]:
        return contextlib.nullcontext(self)  # already open: nothing to set up or close

    async def receive_into(
        self, directory: str, have: _transfer.Have,
        on_written: Callable[[_transfer.ChunkSpec], None] | None = None,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> int:
        # The download's own callback counts files (children bytes), as to_uri's does.
        await asyncio.to_thread(_storage.download_directory, self.uri, directory,
                                callback=callback)
        return self.size


class FromPusher:
    """A push from the driver (``dckpt_push``): the chunks come when asked for."""

    def __init__(self, comm: Comm, peer: str, manifest: _transfer.Manifest,
                 chunk_bytes: int) -> None:
        self._comm, self._peer = comm, peer
        self.manifest, self.size, self.chunk_bytes = manifest, manifest.total_bytes, chunk_bytes
        self.streamed = False  # whether the pusher was asked for chunks (and told "done")

    def describe(self) -> str:
        return self._peer

    def open(self) -> contextlib.AbstractAsyncContextManager[Incoming]:
        return contextlib.nullcontext(self)  # already open: nothing to set up or close

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


async def ask_registry(
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
