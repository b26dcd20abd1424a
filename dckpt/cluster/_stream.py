"""Checkpoints between processes of a Dask cluster, as chunks over one Dask comm.

A transfer takes one comm from distributed's connection pool (so the cluster's TLS and
comm settings apply) and the receiver drives it: it asks for chunks, a few ahead
(``dckpt.transfer.max-in-flight``), and the sender answers each request with one
frame, in order. A sender reads a chunk only when asked, and a receiver asks for the
next one only when it has taken the last, so neither side holds more than a few chunks
however large the checkpoint. (``Comm.write`` does not wait for the bytes to leave, so
the requests are the only back-pressure there is.)

Two ways to start one, both served by every worker's :class:`NodeStore` through a
handler on the worker's server:

``dckpt_pull`` — a receiver copies a checkpoint registered with the store::

    receiver → store    {"op": "dckpt_pull", "checkpoint_id": ..., "chunk_bytes": n}
    store → receiver    {"status": "OK", "manifest": {...}}  or an error (below)
    receiver → store    {"chunk": [file index, offset, length], "raw": bool}  (repeated)
    store → receiver    {"header": bytes, "payload": bytes}                   (one per request)
                     or {"header": bytes, "length": n} then n raw bytes       (asked raw, on TCP)
    receiver → store    {"status": "done"}                       (the comm is reused)

On a TCP comm without TLS, a pull goes on on the bare socket once the manifest is in,
so that neither side's event loop handles the chunks (tornado reads a chunk in one
loop turn per segment it finds; a thread reading the socket needs none)::

    receiver → store    {"detach": True}
    store               takes the socket (a duplicate of its descriptor) and aborts its comm
    store → receiver    b"D" on the socket (b"N" on the comm's stream: it stays on the comm)
    receiver            takes the socket and aborts its comm; then, in a thread each:
    receiver → store    REQUEST records (op chunk, file index, offset, length, link rate)
    store → receiver    REPLY records (op, header length, payload length), header, payload
                     or an error record: REPLY with op error, then error_reply as JSON
    receiver → store    a REQUEST of op done; both close the socket

(:data:`~dckpt.cluster._wire.REQUEST`, :data:`~dckpt.cluster._wire.REPLY`.) No byte
is lost in the hand-over although tornado reads an idle socket (to notice a close):
each side takes the socket only when the other has nothing on the way to it. The store
sends nothing after ``b"D"`` until asked, and the receiver nothing after its
``detach`` until ``b"D"`` has come.

``dckpt_push`` — the driver, which no one can connect to, sends a checkpoint to a
store: it opens the comm with ``{"op": "dckpt_push", "checkpoint_id", "manifest",
"chunk_bytes"}``, then serves the store's chunk requests as a store serves a pull, and
reads the handler's reply when the store says ``done``.

An error is ``{"status": "error", "kind": ..., "message": ...}`` and ends the
transfer; the receiver raises it as the matching dckpt error (:func:`raise_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
)
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed.comm import Comm
from distributed.core import ConnectionPool
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt import _transfer
from dckpt.cluster import _wire
from dckpt.cluster._chunk_receiver import RING_BUFFERS, ChunkChannel
from dckpt.cluster._chunk_sender import Chunks, serve_chunks
from dckpt.cluster._wire import PULL_OP, PUSH_OP, error_reply, raise_error, store_name
from dckpt.errors import (
    CheckpointNotFoundError,
)

__all__ = [
    "PULL_OP", "PUSH_OP", "Chunks", "Pull", "error_reply", "pulling", "push", "raise_error",
    "serve_chunks", "store_name", "stream_over",
]

logger = logging.getLogger(__name__)


async def stream_over(
    comm: Comm,
    peer: str,
    manifest: _transfer.Manifest,
    target: str,
    *,
    chunk_bytes: int,
    in_place: bool = False,
    on_written: Callable[[_transfer.ChunkSpec], None] | None = None,
    callback: Callback = DEFAULT_CALLBACK,
    have: _transfer.Have | None = None,
    detach: bool = False,
) -> _transfer.Received:
    """Receive ``manifest`` into ``target`` over ``comm``, then say ``done``.

    ``in_place``: ``target`` is an empty directory the caller staged; ``have``: files
    the receiver holds, which are not asked for (see
    :func:`dckpt._transfer.receive_directory`). Returns what it returns. ``detach``:
    on plain TCP, take the socket from ``comm`` for the chunks (:class:`ChunkChannel`),
    which leaves ``comm`` aborted; for a comm that is not used again.

    Raises what :func:`dckpt._transfer.receive_directory` raises, or the sender's
    error. Without ``detach``, ``comm`` is left usable only when this returns; after an
    error, abort it.
    """
    channel = ChunkChannel(comm, peer, chunk_bytes, detach=detach)
    try:
        received = await _transfer.receive_directory(
            manifest, channel.stream, target, chunk_bytes=chunk_bytes,
            max_in_flight=channel.window, in_place=in_place, have=have,
            on_written=on_written, callback=callback, source=peer, writes=True)
        # Every write is done: the ring may serve the next transfer. (After a failure a
        # cancelled write may still read its buffer; those buffers are dropped instead.)
        RING_BUFFERS.give(channel.release_ring())
        await channel.finish()
    finally:
        channel.close()
    return received


async def _answered(
    waiting: Awaitable[Any], timeout: float, peer: str, doing: str, setting: str
) -> Any:
    """``await waiting``, bounded by ``timeout``; a timeout says who, what and how long.

    ``asyncio.wait_for`` raises a ``TimeoutError`` with no message at all.
    """
    try:
        return await asyncio.wait_for(waiting, timeout)
    except asyncio.TimeoutError:
        variable = "DASK_" + setting.upper().replace(".", "__").replace("-", "_")
        raise TimeoutError(
            f"{peer} did not answer within {timeout:g} s while {doing}; is its worker "
            f"alive and not stopped? ({setting}, {variable})"
        ) from None






class Pull:
    """A pull whose manifest has come: :meth:`receive_into` takes the chunks.

    ``manifest`` and ``size`` are known before any chunk moves, so the receiver can make
    room (or refuse) and stage a directory first.
    """

    def __init__(self, comm: Comm, peer: str, manifest: _transfer.Manifest,
                 chunk_bytes: int) -> None:
        self.manifest = manifest
        self.size = manifest.total_bytes
        self.received = False
        self._comm = comm
        self._peer = peer
        self._chunk_bytes = chunk_bytes

    async def receive_into(
        self, directory: str, have: _transfer.Have | None = None,
        on_written: Callable[[_transfer.ChunkSpec], None] | None = None,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> int:
        """Fill the empty ``directory`` with the checkpoint (once); asks only for the
        files ``have`` does not name; ``on_written`` and ``callback`` as in
        :func:`dckpt._transfer.receive_directory`. Returns the file bytes that came over
        the comm."""
        # A pull's connection ends with it: the chunks may go on its bare socket.
        received = await stream_over(self._comm, self._peer, self.manifest, directory,
                                     chunk_bytes=self._chunk_bytes, in_place=True, have=have,
                                     on_written=on_written, callback=callback, detach=True)
        self.received = True
        return received.fetched_bytes


@contextlib.asynccontextmanager
async def pulling(
    pool: ConnectionPool,
    address: str,
    checkpoint_id: str,
    digest: str,
    *,
    node_id: str | None = None,
) -> AsyncIterator[Pull]:
    """Ask the store at ``address`` for checkpoint ``checkpoint_id``; yield the :class:`Pull`.

    The store's manifest must have ``digest``: a checkpoint that changed since it was
    referenced raises :class:`~dckpt.errors.CheckpointNotFoundError`. The comm goes
    back to ``pool`` after a pull received to its end on it, and is aborted otherwise (an
    error, a block left without :meth:`Pull.receive_into`, or its socket taken for the
    chunks: plain TCP). ``node_id``, the
    store's node if known, goes into error messages; a store that does not connect or
    answer within ``dckpt.transfer.connect-timeout`` raises a ``TimeoutError`` that
    names it.
    """
    timeout = parse_timedelta(dask.config.get(_wire.CONNECT_TIMEOUT))
    chunk_bytes = _transfer.config_chunk_bytes()
    peer = store_name(address, node_id)
    # A dead owner is found out here, bounded, so that resolution can go on to the
    # next source (a URI) instead of waiting for the comm's own timeout.
    comm = await _answered(pool.connect(address), timeout, peer,
                           f"connecting ({PULL_OP})",
                           _wire.CONNECT_TIMEOUT)
    pull: Pull | None = None
    try:
        await comm.write({"op": PULL_OP, "checkpoint_id": checkpoint_id,
                          "chunk_bytes": chunk_bytes, "reply": False})
        reply = await _answered(comm.read(), timeout, peer,
                                f"asked for a manifest ({PULL_OP})", _wire.CONNECT_TIMEOUT)
        _wire.raise_error(reply, peer)
        manifest = _transfer.Manifest.from_dict(reply["manifest"])
        if manifest.digest != digest:
            raise CheckpointNotFoundError(
                f"checkpoint {checkpoint_id!r} at {peer} changed since it was referenced "
                f"(digest {manifest.digest[:12]}, expected {digest[:12]})"
            )
        pull = Pull(comm, peer, manifest, chunk_bytes)
        yield pull
    finally:
        if pull is None or not pull.received:
            comm.abort()  # answers may be on the way: never reuse it
        pool.reuse(address, comm)  # an aborted comm is dropped, a clean one kept


async def push(
    pool: ConnectionPool, address: str, checkpoint_id: str, source: _transfer.ChunkSource
) -> dict[str, Any]:
    """Send the directory behind ``source`` to the store at ``address`` (the driver's side).

    The store asks for the chunks it needs (none when it holds that checkpoint with that
    digest already) and keeps them in its node's cache. Returns its reply:
    ``{"status": "OK", "node_id": ..., "path": ...}``.
    """
    timeout = parse_timedelta(dask.config.get(_wire.CONNECT_TIMEOUT))
    stall_timeout = parse_timedelta(dask.config.get(_wire.STALL_TIMEOUT))
    peer = store_name(address)
    comm = await _answered(pool.connect(address), timeout, peer,
                           f"connecting ({PUSH_OP})",
                           _wire.CONNECT_TIMEOUT)
    try:
        await comm.write({"op": PUSH_OP, "checkpoint_id": checkpoint_id,
                          "manifest": source.manifest.to_dict(),
                          "chunk_bytes": source.chunk_bytes})
        await serve_chunks(comm, source)
        reply = await _answered(comm.read(), stall_timeout, peer,
                                f"committing a pushed checkpoint ({PUSH_OP})",
                                _wire.STALL_TIMEOUT)
        _wire.raise_error(reply, peer)
    except BaseException:
        comm.abort()
        raise
    finally:
        pool.reuse(address, comm)
    return dict(reply)
