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

``dckpt_push`` — the driver, which no one can connect to, sends a checkpoint to a
store: it opens the comm with ``{"op": "dckpt_push", "checkpoint_id", "manifest",
"chunk_bytes"}``, then serves the store's chunk requests as a store serves a pull, and
reads the handler's reply when the store says ``done``.

An error is ``{"status": "error", "kind": ..., "message": ...}`` and ends the
transfer; the receiver raises it as the matching dckpt error (:func:`raise_error`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import dask.config
from dask.utils import parse_timedelta
from distributed.comm import Comm, CommClosedError, get_address_host
from distributed.core import ConnectionPool
from distributed.protocol import to_serialize
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from tornado.iostream import IOStream, StreamClosedError

from dckpt import _compat, _transfer
from dckpt.errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptChunkError,
)

__all__ = [
    "PULL_OP", "PUSH_OP", "Pull", "error_reply", "pulling", "push", "raise_error", "serve_chunks", "stream_over",
]

logger = logging.getLogger(__name__)

PULL_OP = "dckpt_pull"
PUSH_OP = "dckpt_push"

# kind on the wire -> the error a receiver raises; anything else is a CheckpointError.
_ERRORS: dict[str, type[Exception]] = {
    "not-found": CheckpointNotFoundError,
    "refused": PermissionError,
    "format": CheckpointFormatError,
    "corrupt": CorruptChunkError,
    "value": ValueError,
}


def error_reply(error: BaseException) -> dict[str, str]:
    """The message that tells the other side of a transfer why it ends."""
    kind = next((k for k, cls in _ERRORS.items() if isinstance(error, cls)), "other")
    if isinstance(error, CorruptChunkError):
        kind = "corrupt"
    return {"status": "error", "kind": kind, "message": f"{error}"[:2000]}


def raise_error(reply: object, peer: str) -> None:
    """Raise what an error reply says; also for a reply that is no message at all."""
    if not isinstance(reply, Mapping):
        raise CheckpointError(f"{peer} answered {type(reply).__name__}, not a dckpt message; "
                              "does it run dckpt with its node store installed?")
    if reply.get("status") == "error":
        cls = _ERRORS.get(str(reply.get("kind")), CheckpointError)
        raise cls(f"{peer}: {reply.get('message')}")


class Chunks(Protocol):
    """What a sender serves chunks from: a :class:`~dckpt._transfer.ChunkSource`, or a
    relay's (:class:`~dckpt.cluster._relay.RelaySource`)."""

    manifest: _transfer.Manifest
    chunk_bytes: int

    def read_parts(
        self, spec: _transfer.ChunkSpec, buffer: bytearray | None = None, *,
        max_ratio: float | None = None,
    ) -> tuple[bytes, _transfer.Buffer]: ...

    def read_region(
        self, spec: _transfer.ChunkSpec
    ) -> tuple[bytes, _transfer.FileRegion]: ...


async def serve_chunks(
    comm: Comm,
    source: Chunks,
    *,
    sent: Callable[[int], None] | None = None,
) -> None:
    """Answer chunk requests on ``comm`` until the receiver says ``done`` (sender side).

    An error message from the receiver ends it too, raised here.

    Each chunk is read in a thread, the next one ahead of its request (:class:`_ReadAhead`),
    and sent without a copy (:meth:`ChunkSource.read_parts`). On a TCP comm without
    TLS, a chunk that goes uncompressed (:func:`dckpt._transfer.never_compresses`: on a
    fast link, always) is not read into memory at all: its checksum is computed through
    a small buffer, and its bytes go from the file to the socket with ``os.sendfile``
    (:class:`_FileSender`), which spares the sender two copies of every byte.
    A chunk that cannot be read ends the transfer with an error reply, which is also
    raised here. ``sent(length)`` is called for every chunk as it goes out, so that the
    sender's counters move during a long transfer, not only at its end.
    """
    reader = _ReadAhead(source)
    raw = _raw_stream(comm)
    files = _FileSender.over(comm)
    try:
        while True:
            request = await comm.read()
            raise_error(request, "the receiver")
            if request.get("status") == "done":
                return
            asked_raw = raw is not None and bool(request.get("raw"))
            max_ratio = _max_ratio(request, raw)
            region: _transfer.FileRegion | None = None
            try:
                spec = _chunk_spec(request.get("chunk"))
                if asked_raw and files is not None and _transfer.never_compresses(max_ratio):
                    header, region = await reader.region(spec)
                else:
                    header, payload, buffer = await reader.read(spec, max_ratio)
            except Exception as e:
                await comm.write(error_reply(e))
                raise
            if sent is not None:
                sent(spec.length)
            if region is not None:
                assert raw is not None and files is not None
                try:
                    await comm.write({"header": header, "length": region.length})
                except BaseException:
                    region.close()
                    raise
                try:
                    await files.send(raw, region)
                except BaseException:
                    comm.abort()  # the receiver waits for bytes that will not come
                    raise
            elif asked_raw:
                assert raw is not None
                await comm.write({"header": header, "length": len(payload)})
                await _write_raw(raw, payload)
                reader.give_back(buffer)  # on the wire: free to read the next chunk into
                del payload, buffer
            else:
                # A memoryview travels as a frame of its own; bytes would be pickled.
                # comm.write does not wait for it to leave: the buffer is not reused.
                await comm.write({"header": header, "payload": to_serialize(memoryview(payload))})
                del payload, buffer
    finally:
        reader.close()
        if files is not None:
            files.close()


def _raw_stream(comm: Comm) -> IOStream | None:
    """The TCP (or TLS) stream under ``comm``, or None for other comms.

    Chunk bytes written to it straight after a message skip distributed's framing: the
    sender can wait until they are on the wire (``Comm.write`` does not) and reuse its
    buffer, and the receiver reads them into a buffer of its own instead of one that
    the comm allocates per message. Buffers allocated per chunk cost dearly where glibc
    returns them to the system at once (a nanny's ``MALLOC_TRIM_THRESHOLD_``) and fresh
    pages are slow (VMs with free page reporting): there, a GiB of random data went at
    0.34x the socket baseline with a buffer per chunk, 0.62x reusing them (README,
    "Measured").
    """
    return _compat.tcp_stream(comm)


async def _write_raw(stream: IOStream, payload: _transfer.Buffer) -> None:
    try:
        await stream.write(memoryview(payload))
    except (StreamClosedError, ssl.SSLError) as e:
        raise CommClosedError(f"the receiver went away while a chunk was sent: {e}") from e


class _FileSender:
    """Sends chunk bytes from their file to a comm's socket with ``os.sendfile`` (thread).

    Only once everything the comm queued before (the chunk's header message) has left:
    the bytes go behind tornado's back, straight to the socket, which is non-blocking,
    so the thread waits for room with ``poll``. Nothing else writes to the comm
    meanwhile (:func:`serve_chunks` awaits each send). The thread uses a duplicate of
    the socket's descriptor, so that tornado closing the socket (the receiver went
    away) cannot hand its number to another file under the thread's feet.
    """

    _POLL_SECONDS = 0.25  # how soon a send notices that it was stopped

    def __init__(self, sock: socket.socket, stall_timeout: float) -> None:
        self._fd = os.dup(sock.fileno())
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="dckpt-sendfile")
        self._stop = threading.Event()
        self._stall_timeout = stall_timeout

    @classmethod
    def over(cls, comm: Comm) -> _FileSender | None:
        """A sender for ``comm``, or None when it is no TCP comm without TLS."""
        sock = _compat.plain_tcp_socket(comm)
        if sock is None or not hasattr(os, "sendfile"):
            return None
        return cls(sock, parse_timedelta(dask.config.get(_STALL_TIMEOUT)))

    async def send(self, stream: IOStream, region: _transfer.FileRegion) -> None:
        """Send the bytes of ``region`` after what ``stream`` has queued; closes ``region``
        (once the thread is done with it, also when this is cancelled)."""
        try:
            await stream.write(b"")  # resolves once everything queued before is sent
        except (StreamClosedError, ssl.SSLError) as e:
            region.close()
            raise CommClosedError(f"the receiver went away while a chunk was sent: {e}") from e
        except BaseException:
            region.close()
            raise
        job = self._thread.submit(self._send, region)
        try:
            await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            self._stop.set()  # the thread stops within _POLL_SECONDS, then closes region
            raise

    def close(self) -> None:
        """Stop; the descriptor is closed once a send in progress has stopped."""
        self._stop.set()
        self._thread.submit(os.close, self._fd)
        self._thread.shutdown(wait=False)

    def _send(self, region: _transfer.FileRegion) -> None:
        try:
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            offset, left, idle = region.offset, region.length, 0.0
            while left:
                if self._stop.is_set():
                    raise CommClosedError("the transfer stopped while a chunk was sent")
                try:
                    n = os.sendfile(self._fd, region.fd, offset, left)
                except BlockingIOError:
                    if poller.poll(self._POLL_SECONDS * 1000):
                        idle = 0.0
                    else:
                        idle += self._POLL_SECONDS
                        if idle >= self._stall_timeout:
                            raise TimeoutError(
                                f"the receiver took nothing for {self._stall_timeout:g} s "
                                "(dckpt.transfer.stall-timeout)"
                            ) from None
                    continue
                except OSError as e:  # EPIPE, ECONNRESET: the receiver went away
                    raise CommClosedError(
                        f"the receiver went away while a chunk was sent: {e}") from e
                if n == 0:
                    raise CheckpointFormatError(
                        f"{region.path!r} ends at byte {offset}, within a chunk being sent: "
                        "the directory changed after its manifest was built; register it "
                        "again (a checkpoint must not change once registered)"
                    )
                offset += n
                left -= n
        finally:
            region.close()


class _ReadAhead:
    """Reads chunks in a thread of its own, and the chunk after each one in advance.

    A receiver asks for the next chunk only once it has the last one (to bound its
    memory), so a sender that waited for the question would leave the pipe empty while
    it reads. Reading the chunk that follows in manifest order ahead of the question
    overlaps the read with the send, for one chunk of memory more. One thread of its
    own, not asyncio's pool: glibc gives each allocating thread an arena, which keeps
    what was freed in it.
    """

    def __init__(self, source: Chunks) -> None:
        self._source = source
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="dckpt-send")
        self._ahead: tuple[_transfer.ChunkSpec, asyncio.Future[Any]] | None = None
        self._ahead_region: tuple[_transfer.ChunkSpec, concurrent.futures.Future[Any]] | None
        self._ahead_region = None
        # Buffers whose bytes are on the wire; two suffice (one sent, one read ahead).
        self._free: list[bytearray] = []

    async def read(
        self, spec: _transfer.ChunkSpec, max_ratio: float | None = None
    ) -> tuple[bytes, _transfer.Buffer, bytearray]:
        """``(header, payload, buffer)``: hand ``buffer`` back once the payload is sent.

        ``max_ratio`` (when compression pays, :func:`_max_ratio`) applies to this chunk
        if it is not read ahead already, and to the one read ahead next.
        """
        _drop_region(self._ahead_region)
        self._ahead_region = None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == spec:
            future = ahead[1]
        else:
            if ahead is not None:
                ahead[1].cancel()
            future = self._start(spec, max_ratio)
        parts: tuple[bytes, _transfer.Buffer, bytearray] = await future
        following = _following(self._source, spec)
        if following is not None:
            self._ahead = (following, self._start(following, max_ratio))
        return parts

    async def region(
        self, spec: _transfer.ChunkSpec
    ) -> tuple[bytes, _transfer.FileRegion]:
        """``(header, region)`` of ``spec`` (:meth:`ChunkSource.read_region`), read in
        the thread, and the region of the chunk after it ahead of its request (its
        checksum: there is no buffer to fill); close the region once sent."""
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        ahead, self._ahead_region = self._ahead_region, None
        if ahead is not None and ahead[0] == spec:
            job = ahead[1]
        else:
            _drop_region(ahead)
            job = self._thread.submit(self._source.read_region, spec)
        try:
            result: tuple[bytes, _transfer.FileRegion] = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            job.add_done_callback(_close_region)  # if the read finishes after all
            raise
        following = _following(self._source, spec)
        if following is not None:
            self._ahead_region = (following,
                                  self._thread.submit(self._source.read_region, following))
        return result

    def give_back(self, buffer: bytearray) -> None:
        """``buffer``'s chunk has left: the next read may overwrite it."""
        if len(self._free) < 2 and len(buffer) == self._source.chunk_bytes:
            self._free.append(buffer)

    def close(self) -> None:
        _drop_region(self._ahead_region)
        self._ahead_region = None
        if self._ahead is not None:
            self._ahead[1].cancel()
        self._thread.shutdown(wait=False)
        self._free.clear()

    def _start(self, spec: _transfer.ChunkSpec, max_ratio: float | None) -> asyncio.Future[Any]:
        # A chunk shorter than chunk_bytes (a small file's) gets a buffer of its size:
        # a fresh bytearray is zeroed, which costs as much as the read for small files.
        buffer = self._free.pop() if self._free else bytearray(spec.length)

        def read() -> tuple[bytes, _transfer.Buffer, bytearray]:
            header, payload = self._source.read_parts(spec, buffer, max_ratio=max_ratio)
            return header, payload, buffer

        future = asyncio.get_running_loop().run_in_executor(self._thread, read)
        # A read ahead that nobody asks for may fail unseen (the receiver stopped).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future


def _close_region(job: concurrent.futures.Future[Any]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result()[1].close()


def _drop_region(ahead: tuple[_transfer.ChunkSpec, concurrent.futures.Future[Any]] | None) -> None:
    """A region read ahead that nobody will send: not read, or closed once read."""
    if ahead is not None:
        ahead[1].cancel()
        ahead[1].add_done_callback(_close_region)


def _max_ratio(request: Mapping[str, Any], raw: IOStream | None) -> float | None:
    """When compressing a chunk pays, from the link rate the receiver measured.

    On TCP (raw chunks) the receiver times each chunk's bytes and reports the rate in
    its requests (``"link"``, bytes/s): a chunk compresses only below
    :func:`dckpt._transfer.max_ratio_for_link` of it; before the first measurement,
    not at all (a cluster's links are mostly fast). Other comms measure nothing: the
    fixed rule of :func:`dckpt._transfer.encode_parts` (None).
    """
    if raw is None or not request.get("raw"):
        return None
    link = request.get("link")
    if isinstance(link, (int, float)) and not isinstance(link, bool) and link > 0:
        return _transfer.max_ratio_for_link(float(link))
    return 0.0


def _following(source: Chunks, spec: _transfer.ChunkSpec) -> _transfer.ChunkSpec | None:
    """The chunk after ``spec`` in manifest order (:meth:`Manifest.chunks`), if any."""
    files = source.manifest.files
    index, offset = spec.file_index, spec.offset + spec.length
    while index < len(files):
        if offset < files[index].size:
            return _transfer.ChunkSpec(index, offset,
                                      min(source.chunk_bytes, files[index].size - offset))
        index, offset = index + 1, 0
    return None


def _chunk_spec(value: object) -> _transfer.ChunkSpec:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise CheckpointFormatError(f"a chunk request holds {value!r}, not 3 integers")
    return _transfer.ChunkSpec(*value)


class _BufferPool:
    """Chunk buffers kept from one transfer to the next in this process (thread-safe).

    A receiver's ring of raw chunk buffers is touched once per transfer; allocated
    anew each time it would be fresh memory each time where glibc hands large blocks
    back to the system at once (``mmap``: a nanny's ``MALLOC_TRIM_THRESHOLD_`` fixes the
    threshold at 128 KiB), which on a VM with free page reporting costs 1 to 3 s per
    GiB to touch. The price: a process that received a checkpoint keeps ``limit``
    buffers (16 MiB with the default 8 MiB chunks) for the next one.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes: a kept one if there is one, else a new one."""
        with self._lock:
            for i, buffer in enumerate(self._free):
                if len(buffer) == size:
                    return self._free.pop(i)
        return bytearray(size)

    def give(self, buffers: Sequence[bytearray]) -> None:
        """Keep ``buffers`` (the latest first) for later transfers, up to the limit."""
        with self._lock:
            self._free = [*buffers, *self._free][: self._limit]

    def held(self) -> int:
        """Bytes kept now."""
        with self._lock:
            return sum(len(buffer) for buffer in self._free)


# Two: the ring of a transfer at the default max-in-flight of 1.
_RING_BUFFERS = _BufferPool(2)


class _Channel:
    """The receiver's end of a transfer: a :data:`~dckpt._transfer.ChunkStream` on ``comm``.

    A stream left early (an error, a cancellation) leaves answers on the way: the comm
    is then aborted by whoever opened it, never reused.
    """

    def __init__(self, comm: Comm, peer: str, chunk_bytes: int) -> None:
        self.comm = comm
        self.peer = peer
        self.window = int(dask.config.get("dckpt.transfer.max-in-flight"))
        self.stall_timeout = parse_timedelta(dask.config.get("dckpt.transfer.stall-timeout"))
        self._raw = _raw_stream(comm)
        # No link to measure between two processes of one machine: its cores, which
        # lz4 would take from both sides, are the limit (see _is_loopback).
        self._loopback = _is_loopback(comm.peer_address)
        self._chunk_bytes = chunk_bytes
        # Raw chunks land in a ring of buffers. receive_directory writes at most
        # ``window`` frames at once and takes one more meanwhile, retiring writes oldest
        # first, so a ring one longer than the window, reused in order, never
        # overwrites a frame still being written (tests/cluster/test_stream_buffers.py).
        self._ring: list[bytearray] = []
        self._next = 0
        self._link: float | None = None  # bytes/s of raw chunks: the fastest seen

    async def stream(
        self, specs: Sequence[_transfer.ChunkSpec]
    ) -> AsyncGenerator[tuple[_transfer.ChunkSpec, _transfer.Frame], None]:
        pending = iter(specs)
        asked: list[_transfer.ChunkSpec] = []
        # Raw chunks wait in the kernel's socket buffers until read into the ring, so on
        # TCP one more request than the window costs no memory on either side (the
        # sender holds no buffer for a chunk it sends from the file) and keeps the
        # sender busy while this side turns round between two chunks; without it, the
        # pipe ran dry at every chunk (16 MiB chunks took 0.2-0.3 s less CPU per GiB
        # on either side than 8 MiB ones).
        ahead = self.window + (1 if self._raw is not None else 0)
        for spec in pending:
            await self._ask(spec, asked)
            if len(asked) >= ahead:
                break
        answered = 0
        while answered < len(asked):
            reply = await self._read(self.comm.read())
            spec = asked[answered]
            answered += 1
            raise_error(reply, self.peer)
            if "header" in reply and "length" in reply and self._raw is not None:
                payload: Any = await self._read_raw(reply["length"], spec)
            elif "header" in reply and "payload" in reply:
                payload = reply.pop("payload")
            else:
                raise CheckpointFormatError(f"{self.peer} sent {sorted(reply)} for a chunk")
            for following in pending:  # keep the window full before handling this one
                await self._ask(following, asked)
                break
            frame = (reply.pop("header"), payload)
            del reply, payload
            yield spec, frame
            del frame  # held by the receiver now, and only as long as it needs it

    def release_ring(self) -> list[bytearray]:
        """The ring's buffers, no longer this channel's."""
        ring, self._ring = self._ring, []
        return ring

    async def _ask(self, spec: _transfer.ChunkSpec, asked: list[_transfer.ChunkSpec]) -> None:
        request: dict[str, Any] = {"chunk": [spec.file_index, spec.offset, spec.length],
                                   "raw": self._raw is not None}
        if self._link is not None and not self._loopback:
            request["link"] = self._link  # the sender compresses only where it pays
        await self.comm.write(request)
        asked.append(spec)

    async def _read_raw(self, length: object, spec: _transfer.ChunkSpec) -> memoryview:
        # A frame is never longer than its chunk: the header's length must match it.
        if not isinstance(length, int) or not 0 < length <= spec.length:
            raise CheckpointFormatError(f"{self.peer} announced {length!r} bytes for {spec}")
        if len(self._ring) <= self.window:
            self._ring.append(_RING_BUFFERS.take(self._chunk_bytes))
            buffer = self._ring[-1]
        else:
            buffer = self._ring[self._next]
            self._next = (self._next + 1) % len(self._ring)
        view = memoryview(buffer)[:length]
        assert self._raw is not None
        started = time.perf_counter()
        try:
            # A memoryview works (distributed's own TCP.read passes them too).
            await self._read(self._raw.read_into(view))  # type: ignore[arg-type]
        except (StreamClosedError, ssl.SSLError) as e:
            raise CommClosedError(f"{self.peer} went away while sending a chunk: {e}") from e
        elapsed = time.perf_counter() - started
        self._link = _link_rate(self._link, length, elapsed)
        return view

    async def _read(self, reading: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(reading, self.stall_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{self.peer} sent nothing for {self.stall_timeout:g} s "
                "(dckpt.transfer.stall-timeout)"
            ) from None


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
) -> _transfer.Received:
    """Receive ``manifest`` into ``target`` over ``comm``, then say ``done``.

    ``in_place``: ``target`` is an empty directory the caller staged; ``have``: files
    the receiver holds, which are not asked for (see
    :func:`dckpt._transfer.receive_directory`). Returns what it returns.

    Raises what :func:`dckpt._transfer.receive_directory` raises, or the sender's
    error. ``comm`` is left usable only when this returns; after an error, abort it.
    """
    channel = _Channel(comm, peer, chunk_bytes)
    received = await _transfer.receive_directory(
        manifest, channel.stream, target, chunk_bytes=chunk_bytes,
        max_in_flight=channel.window, in_place=in_place, have=have,
        on_written=on_written, callback=callback, source=peer)
    # Every write is done: the ring may serve the next transfer. (After a failure a
    # cancelled write may still read its buffer; those buffers are dropped instead.)
    _RING_BUFFERS.give(channel.release_ring())
    await comm.write({"status": "done"})
    return received


def store_name(address: str, node_id: str | None = None) -> str:
    """How messages name a store: ``the store of node node-1 at tcp://...``."""
    return f"the store of node {node_id} at {address}" if node_id else f"the store at {address}"


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


_LINK_SAMPLE_BYTES = 256 * 1024


def _is_loopback(address: str) -> bool:
    """Whether ``address`` (a comm's peer) is on a loopback interface of this machine.

    A loopback is no link: what limits it are the cores the two sides share, and on a
    busy machine chunks arrive slowly for want of a core, which would look like a slow
    link to the rate a receiver measures and make the sender compress (0.47x the socket
    copy against 0.78x without, one run each under load). Such a receiver reports no
    link rate, so its sender never compresses.
    """
    try:
        host = get_address_host(address)
    except (ValueError, TypeError):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _link_rate(known: float | None, length: int, elapsed: float) -> float | None:
    """The link's rate (bytes/s) as known after a raw chunk of ``length`` bytes took
    ``elapsed`` seconds to read.

    The sender has the whole payload ready before its header goes out, so ``elapsed`` is
    at least the link's time for these bytes; short reads say more about latency and
    are left out. The fastest chunk so far, not an average: a chunk is slow also when
    either side waited for a core (both nodes on one loaded machine), and an average of
    those made the sender compress on a loopback, where compressing only costs.
    """
    if length < _LINK_SAMPLE_BYTES or elapsed <= 0:
        return known
    return max(known or 0.0, length / elapsed)
_CONNECT_TIMEOUT = "dckpt.transfer.connect-timeout"
_STALL_TIMEOUT = "dckpt.transfer.stall-timeout"


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
        received = await stream_over(self._comm, self._peer, self.manifest, directory,
                                     chunk_bytes=self._chunk_bytes, in_place=True, have=have,
                                     on_written=on_written, callback=callback)
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
    back to ``pool`` after a pull received to its end, and is aborted otherwise (an
    error, or a block left without :meth:`Pull.receive_into`). ``node_id``, the
    store's node if known, goes into error messages; a store that does not connect or
    answer within ``dckpt.transfer.connect-timeout`` raises a ``TimeoutError`` that
    names it.
    """
    timeout = parse_timedelta(dask.config.get(_CONNECT_TIMEOUT))
    chunk_bytes = _transfer.config_chunk_bytes()
    peer = store_name(address, node_id)
    # A dead owner is found out here, bounded, so that resolution can go on to the
    # next source (a URI) instead of waiting for the comm's own timeout.
    comm = await _answered(pool.connect(address), timeout, peer,
                           f"connecting ({PULL_OP})",
                           _CONNECT_TIMEOUT)
    pull: Pull | None = None
    try:
        await comm.write({"op": PULL_OP, "checkpoint_id": checkpoint_id,
                          "chunk_bytes": chunk_bytes, "reply": False})
        reply = await _answered(comm.read(), timeout, peer,
                                f"asked for a manifest ({PULL_OP})", _CONNECT_TIMEOUT)
        raise_error(reply, peer)
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
    timeout = parse_timedelta(dask.config.get(_CONNECT_TIMEOUT))
    stall_timeout = parse_timedelta(dask.config.get(_STALL_TIMEOUT))
    peer = store_name(address)
    comm = await _answered(pool.connect(address), timeout, peer,
                           f"connecting ({PUSH_OP})",
                           _CONNECT_TIMEOUT)
    try:
        await comm.write({"op": PUSH_OP, "checkpoint_id": checkpoint_id,
                          "manifest": source.manifest.to_dict(),
                          "chunk_bytes": source.chunk_bytes})
        await serve_chunks(comm, source)
        reply = await _answered(comm.read(), stall_timeout, peer,
                                f"committing a pushed checkpoint ({PUSH_OP})",
                                _STALL_TIMEOUT)
        raise_error(reply, peer)
    except BaseException:
        comm.abort()
        raise
    finally:
        pool.reuse(address, comm)
    return dict(reply)
