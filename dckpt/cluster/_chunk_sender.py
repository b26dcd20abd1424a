"""The sender's end of a transfer: answering chunk requests on a comm.

:func:`serve_chunks` reads each chunk asked for (and the next one ahead), and sends it
as one frame: in a message, raw after a small message on TCP, or straight from its file
with ``os.sendfile`` on plain TCP when it goes uncompressed. Protocol:
:mod:`dckpt.cluster._stream`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import select
import socket
import ssl
import threading
from collections.abc import (
    Callable,
    Mapping,
)
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import dask.config
from dask.utils import parse_timedelta
from distributed.comm import Comm, CommClosedError
from distributed.protocol import to_serialize
from tornado.iostream import IOStream, StreamClosedError

from dckpt import _compat, _transfer
from dckpt.cluster import _wire
from dckpt.errors import (
    CheckpointFormatError,
)

__all__ = ["Chunks", "next_chunk", "read_parts", "read_region", "serve_chunks"]

logger = logging.getLogger(__name__)


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


def read_parts(
    source: Chunks, spec: _transfer.ChunkSpec, buffer: bytearray | None,
    max_ratio: float | None,
) -> tuple[bytes, _transfer.Buffer]:
    """A chunk to send from a buffer: :meth:`Chunks.read_parts` (thread). With
    :func:`read_region`, every chunk a sender sends is read through here."""
    return source.read_parts(spec, buffer, max_ratio=max_ratio)


def read_region(
    source: Chunks, spec: _transfer.ChunkSpec
) -> tuple[bytes, _transfer.FileRegion]:
    """A chunk to send from its file: :meth:`Chunks.read_region` (thread)."""
    return source.read_region(spec)


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
    sender's counters move during a long transfer, not only at its end (from a thread,
    once the socket is taken).

    Asked to ``detach`` (plain TCP), it takes the socket from ``comm``, which it aborts,
    and serves the rest in a thread on the bare socket (:func:`_serve_detached`).
    """
    reader = _ReadAhead(source)
    raw = _wire.raw_stream(comm)
    files = _FileSender.over(comm)
    try:
        while True:
            request = await comm.read()
            _wire.raise_error(request, "the receiver")
            if request.get("status") == "done":
                return
            if request.get("detach") and raw is not None:
                if files is None:  # TLS: no socket to take; the receiver stays on the comm
                    await _write_raw(raw, b"N")
                    continue
                files.close()
                files = None
                await _serve_detached(_wire.take_socket(comm), reader, sent)
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
                await comm.write(_wire.error_reply(e))
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


async def _write_raw(stream: IOStream, payload: _transfer.Buffer) -> None:
    try:
        await stream.write(memoryview(payload))
    except (StreamClosedError, ssl.SSLError) as e:
        raise CommClosedError(f"the receiver went away while a chunk was sent: {e}") from e


async def _serve_detached(
    sock: socket.socket, reader: _ReadAhead, sent: Callable[[int], None] | None
) -> None:
    """:func:`_serve_detached_loop` in a thread of its own; on cancellation the socket is
    shut down, which ends the thread's wait; closed once the thread is done."""
    stall_timeout = parse_timedelta(dask.config.get(_wire.STALL_TIMEOUT))
    thread = ThreadPoolExecutor(1, thread_name_prefix="dckpt-send-socket")
    job = thread.submit(_serve_detached_loop, sock, reader, sent, stall_timeout)
    try:
        await asyncio.wrap_future(job)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise
    finally:
        job.add_done_callback(lambda _: sock.close())
        thread.shutdown(wait=False)


def _serve_detached_loop(
    sock: socket.socket, reader: _ReadAhead, sent: Callable[[int], None] | None,
    stall_timeout: float,
) -> None:
    """Answer :data:`~dckpt.cluster._wire.REQUEST` records on ``sock`` until the
    receiver says done (thread).

    The chunk protocol of the comm, with the comm's and the event loop's work per read
    gone: a chunk that goes uncompressed is sent from its file (``os.sendfile``), any
    other from its buffer. Chunks are read as on the comm, by ``reader`` (the chunk
    after each one read, and compressed, while this one is sent), waited for here. A
    chunk that cannot be read is answered with an error record, and raised here.
    """
    sock.settimeout(stall_timeout)
    with _to_the_receiver(stall_timeout):
        sock.sendall(_wire.DETACHED)
    request = memoryview(bytearray(_wire.REQUEST.size))
    while True:
        with _to_the_receiver(stall_timeout):
            _wire.recv_exactly(sock, request)
        op, index, offset, length, link = _wire.REQUEST.unpack(request)
        if op == _wire.Op.DONE:
            return
        max_ratio = _transfer.max_ratio_for_link(link) if link > 0 else 0.0
        region: _transfer.FileRegion | None = None
        try:
            if op != _wire.Op.CHUNK:
                raise CheckpointFormatError(f"a request on the socket has op {op}")
            spec = _chunk_spec([index, offset, length])
            if _transfer.never_compresses(max_ratio):
                header, region = reader.region_now(spec, stall_timeout)
                size = region.length
            else:
                header, payload, buffer = reader.read_now(spec, max_ratio, stall_timeout)
                size = len(payload)
        except Exception as e:
            with _to_the_receiver(stall_timeout):
                sock.sendall(_wire.error_record(e))
            raise
        if sent is not None:
            sent(spec.length)
        record = _wire.REPLY.pack(_wire.Op.CHUNK, len(header), size) + header
        if region is not None:
            try:
                with _to_the_receiver(stall_timeout):
                    sock.sendall(record)
            except BaseException:
                region.close()
                raise
            _send_region(sock.fileno(), region, stall_timeout, lambda: False)
        else:
            with _to_the_receiver(stall_timeout):
                sock.sendall(record)
                sock.sendall(payload)
            reader.give_back(buffer)
            del payload, buffer


def _to_the_receiver(stall_timeout: float) -> contextlib.AbstractContextManager[None]:
    """A taken socket's errors as the comm's would be (the sender's side)."""
    return _wire.socket_errors(
        f"the receiver took nothing for {stall_timeout:g} s ({_wire.STALL_TIMEOUT})",
        "the receiver went away")


class _FileSender:
    """Sends chunk bytes from their file to a comm's socket with ``os.sendfile`` (thread).

    Only once everything the comm queued before (the chunk's header message) has left:
    the bytes go behind tornado's back, straight to the socket, which is non-blocking,
    so the thread waits for room with ``poll``. Nothing else writes to the comm
    meanwhile (:func:`serve_chunks` awaits each send). The thread uses a duplicate of
    the socket's descriptor, so that tornado closing the socket (the receiver went
    away) cannot hand its number to another file under the thread's feet.
    """

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
        return cls(sock, parse_timedelta(dask.config.get(_wire.STALL_TIMEOUT)))

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
        _send_region(self._fd, region, self._stall_timeout, self._stop.is_set)


_POLL_SECONDS = 0.25  # how soon a send notices that it was stopped


def _send_region(
    fd: int, region: _transfer.FileRegion, stall_timeout: float, stopped: Callable[[], bool]
) -> None:
    """Send ``region`` to the non-blocking socket ``fd`` with ``os.sendfile``, waiting
    for room with ``poll`` (thread); closes ``region``. ``stopped()`` is asked at
    least every quarter second."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        offset, left, idle = region.offset, region.length, 0.0
        while left:
            if stopped():
                raise CommClosedError("the transfer stopped while a chunk was sent")
            try:
                n = os.sendfile(fd, region.fd, offset, left)
            except BlockingIOError:
                if poller.poll(_POLL_SECONDS * 1000):
                    idle = 0.0
                else:
                    idle += _POLL_SECONDS
                    if idle >= stall_timeout:
                        raise TimeoutError(
                            f"the receiver took nothing for {stall_timeout:g} s "
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

    Asked from the event loop (:meth:`read`, :meth:`region`) on a comm, and from the
    thread of a detached socket (:meth:`read_now`, :meth:`region_now`) once the
    transfer went there: that thread waits for the reading thread directly, not for a
    turn of the event loop, which a worker's own callbacks keep busy (a fetch of 64
    small files from another node took 74-99 ms with a round trip through the loop per
    chunk, 63-76 ms without, on a 2-core machine). A lock keeps the bookkeeping whole:
    :meth:`close` comes from the loop while that thread may still be at work.
    """

    def __init__(self, source: Chunks) -> None:
        self._source = source
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="dckpt-send")
        self._lock = threading.Lock()
        self._closed = False
        # The chunk read ahead into a buffer, or as a region (one of the two at most).
        self._ahead: tuple[_transfer.ChunkSpec, concurrent.futures.Future[Any]] | None = None
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
        parts: tuple[bytes, _transfer.Buffer, bytearray] = await asyncio.wrap_future(
            self._read_job(spec, max_ratio))
        self._read_next(spec, max_ratio)
        return parts

    def read_now(
        self, spec: _transfer.ChunkSpec, max_ratio: float | None, timeout: float
    ) -> tuple[bytes, _transfer.Buffer, bytearray]:
        """:meth:`read`, waited for in this thread (not the event loop's), ``timeout``
        seconds at most."""
        parts: tuple[bytes, _transfer.Buffer, bytearray] = _result(
            self._read_job(spec, max_ratio), timeout)
        self._read_next(spec, max_ratio)
        return parts

    async def region(
        self, spec: _transfer.ChunkSpec
    ) -> tuple[bytes, _transfer.FileRegion]:
        """``(header, region)`` of ``spec`` (:meth:`ChunkSource.read_region`), read in
        the thread, and the region of the chunk after it ahead of its request (its
        checksum: there is no buffer to fill); close the region once sent."""
        job = self._region_job(spec)
        try:
            result: tuple[bytes, _transfer.FileRegion] = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            job.add_done_callback(_close_region)  # if the read finishes after all
            raise
        self._region_next(spec)
        return result

    def region_now(
        self, spec: _transfer.ChunkSpec, timeout: float
    ) -> tuple[bytes, _transfer.FileRegion]:
        """:meth:`region`, waited for in this thread, ``timeout`` seconds at most."""
        job = self._region_job(spec)
        try:
            result: tuple[bytes, _transfer.FileRegion] = _result(job, timeout)
        except BaseException:
            job.add_done_callback(_close_region)
            raise
        self._region_next(spec)
        return result

    def give_back(self, buffer: bytearray) -> None:
        """``buffer``'s chunk has left: the next read may overwrite it."""
        with self._lock:
            if len(self._free) < 2 and len(buffer) == self._source.chunk_bytes:
                self._free.append(buffer)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            _drop_region(self._ahead_region)
            self._ahead_region = None
            if self._ahead is not None:
                self._ahead[1].cancel()
                self._ahead = None
            self._thread.shutdown(wait=False)
            self._free.clear()

    def _read_job(self, spec: _transfer.ChunkSpec,
                  max_ratio: float | None) -> concurrent.futures.Future[Any]:
        with self._lock:
            self._check_open()
            _drop_region(self._ahead_region)
            self._ahead_region = None
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead[0] == spec:
                return ahead[1]
            if ahead is not None:
                ahead[1].cancel()
            return self._start(spec, max_ratio)

    def _read_next(self, spec: _transfer.ChunkSpec, max_ratio: float | None) -> None:
        after = next_chunk(self._source, spec)
        with self._lock:
            if after is not None and not self._closed:
                self._ahead = (after, self._start(after, max_ratio))

    def _region_job(self, spec: _transfer.ChunkSpec) -> concurrent.futures.Future[Any]:
        with self._lock:
            self._check_open()
            if self._ahead is not None:
                self._ahead[1].cancel()
                self._ahead = None
            ahead, self._ahead_region = self._ahead_region, None
            if ahead is not None and ahead[0] == spec:
                return ahead[1]
            _drop_region(ahead)
            return self._thread.submit(read_region, self._source, spec)

    def _region_next(self, spec: _transfer.ChunkSpec) -> None:
        after = next_chunk(self._source, spec)
        with self._lock:
            if after is not None and not self._closed:
                self._ahead_region = (after,
                                      self._thread.submit(read_region, self._source, after))

    def _check_open(self) -> None:
        if self._closed:
            raise CommClosedError("the transfer ended: no more chunks are read")

    def _start(self, spec: _transfer.ChunkSpec,
               max_ratio: float | None) -> concurrent.futures.Future[Any]:
        # A chunk shorter than chunk_bytes (a small file's) gets a buffer of its size:
        # a fresh bytearray is zeroed, which costs as much as the read for small files.
        buffer = self._free.pop() if self._free else bytearray(spec.length)

        def read() -> tuple[bytes, _transfer.Buffer, bytearray]:
            header, payload = read_parts(self._source, spec, buffer, max_ratio)
            return header, payload, buffer

        return self._thread.submit(read)


def _result(job: concurrent.futures.Future[Any], timeout: float) -> Any:
    """What ``job`` returns, waited for ``timeout`` seconds at most."""
    try:
        return job.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        job.cancel()
        raise TimeoutError(f"reading a chunk to send took more than {timeout:g} s "
                           "(dckpt.transfer.stall-timeout)") from None


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


def next_chunk(source: Chunks, spec: _transfer.ChunkSpec) -> _transfer.ChunkSpec | None:
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
