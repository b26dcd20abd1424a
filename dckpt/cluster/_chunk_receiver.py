"""The receiver's end of a transfer: asking for chunks and taking their frames.

:class:`ChunkChannel` is the :data:`~dckpt._transfer.ChunkStream` that
:func:`~dckpt._transfer.receive_directory` consumes: it keeps ``max-in-flight``
requests out and measures the link for the sender's choice of compression. On a comm
it reads raw chunks into a ring of buffers kept between transfers
(:data:`RING_BUFFERS`). On plain TCP it can take the socket from its comm and go on
there, in a thread, which then also writes each chunk as it lands (a
:data:`~dckpt._transfer.WritingStream`): no ring, but for a compressed chunk.
Protocol: :mod:`dckpt.cluster._stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import dask.config
from dask.utils import parse_timedelta
from distributed.comm import Comm, CommClosedError
from tornado.iostream import StreamClosedError

from dckpt import _compat, _transfer
from dckpt.cluster import _wire
from dckpt.errors import (
    CheckpointError,
    CheckpointFormatError,
)

_T = TypeVar("_T")

_MAX_HEADER = 4096  # a frame's header is a few dozen bytes; an error message a few KiB

__all__ = ["BufferPool", "ChunkChannel", "RING_BUFFERS", "link_rate"]

logger = logging.getLogger(__name__)


class BufferPool:
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
RING_BUFFERS = BufferPool(2)


class ChunkChannel:
    """The receiver's end of a transfer: a :data:`~dckpt._transfer.ChunkStream` on ``comm``.

    A stream left early (an error, a cancellation) leaves answers on the way: the comm
    is then aborted by whoever opened it, never reused. :meth:`finish` says ``done``
    after a transfer; :meth:`close` ends what the channel holds, whatever happened.

    With ``detach`` on a TCP comm without TLS, the first :meth:`stream` asks the sender to
    go on on the bare socket: the comm is aborted, and requests and replies are records
    (:data:`~dckpt.cluster._wire.REQUEST`, :data:`~dckpt.cluster._wire.REPLY`) that one
    thread of the channel's own sends and reads. Tornado reads a chunk on the event
    loop, a turn of the loop each time the socket has more; the channel's thread reads
    it with no loop at all and, with the :class:`~dckpt._transfer.ChunkWriter` that
    :meth:`stream` needs there, writes it too, piece by piece as it lands, and goes on
    to the next chunk with no loop in between (:meth:`_write_on_socket`). Only for a
    comm nobody reuses (a pull's: the connection is closed at the end).
    """

    def __init__(self, comm: Comm, peer: str, chunk_bytes: int, *, detach: bool = False) -> None:
        self.comm = comm
        self.peer = peer
        self.window = int(dask.config.get("dckpt.transfer.max-in-flight"))
        self.stall_timeout = parse_timedelta(dask.config.get("dckpt.transfer.stall-timeout"))
        self._raw = _wire.raw_stream(comm)
        # No link to measure between two processes of one machine: its cores, which
        # lz4 would take from both sides, are the limit (see is_loopback).
        self._loopback = _wire.is_loopback(comm.peer_address)
        self._chunk_bytes = chunk_bytes
        # Raw chunks land in a ring of buffers. receive_directory writes at most
        # ``window`` frames at once and takes one more meanwhile, retiring writes oldest
        # first, so a ring one longer than the window, reused in order, never
        # overwrites a frame still being written (test_a_slow_first_write_keeps_its_buffer).
        self._ring: list[bytearray] = []
        self._next = 0
        self._link: float | None = None  # bytes/s of raw chunks: the fastest seen
        self._detach = detach and _compat.plain_tcp_socket(comm) is not None
        self._socket: socket.socket | None = None
        self._thread: ThreadPoolExecutor | None = None  # the socket's only user

    async def stream(
        self, specs: Sequence[_transfer.ChunkSpec], writer: _transfer.ChunkWriter | None = None,
    ) -> AsyncGenerator[tuple[_transfer.ChunkSpec, _transfer.Frame | _transfer.Written], None]:
        """The frames of ``specs``; on the taken socket, where ``writer`` is needed,
        each chunk is written by the channel's thread as it lands
        (:meth:`_write_on_socket`) and :class:`~dckpt._transfer.Written` yielded in
        place of its frame."""
        if self._detach:
            self._detach = False
            await self._take_socket()
        if self._socket is not None:
            if writer is None:
                raise TypeError("a ChunkChannel on a taken socket writes its chunks itself: "
                                "stream() needs a ChunkWriter")
            async for item in self._write_on_socket(specs, writer):
                yield item
            return
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
            spec = asked[answered]
            answered += 1
            frame = await self._receive(spec)
            for following in pending:  # keep the window full before handling this one
                await self._ask(following, asked)
                break
            yield spec, frame
            del frame  # held by the receiver now, and only as long as it needs it

    async def finish(self) -> None:
        """Say ``done``: every chunk is in (on the comm, or on the socket taken from it)."""
        if self._socket is None:
            await self.comm.write({"status": "done"})
            return
        record = _wire.REQUEST.pack(_wire.Op.DONE, 0, 0, 0, 0.0)
        await self._on_socket(self._socket.sendall, record)

    def close(self) -> None:
        """Let go of the socket taken from the comm, if any (a read in progress ends)."""
        sock, self._socket = self._socket, None
        if sock is None or self._thread is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        self._thread.submit(sock.close)  # once the thread has let go of it
        self._thread.shutdown(wait=False)

    async def _take_socket(self) -> None:
        """Ask the sender to go on on the bare socket; take it if it agrees."""
        assert self._raw is not None
        await self.comm.write({"detach": True})
        try:
            answer = await self._read(self._raw.read_bytes(1))
        except (StreamClosedError, ssl.SSLError) as e:
            raise CommClosedError(f"{self.peer} went away: {e}") from e
        if answer == b"N":
            return  # the sender stays on the comm
        if answer != _wire.DETACHED:
            raise CheckpointFormatError(f"{self.peer} answered {answer!r} to a detach")
        # The sender sends nothing more until asked: tornado holds no byte of ours.
        self._socket = _wire.take_socket(self.comm)
        self._socket.settimeout(self.stall_timeout)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="dckpt-receive-socket")

    async def _on_socket(self, function: Callable[..., _T], *args: Any) -> _T:
        assert self._thread is not None
        return await asyncio.wrap_future(self._thread.submit(function, *args))

    def _socket_errors(self) -> contextlib.AbstractContextManager[None]:
        return _wire.socket_errors(
            f"{self.peer} sent nothing for {self.stall_timeout:g} s ({_wire.STALL_TIMEOUT})",
            f"{self.peer} went away while sending a chunk")

    async def _write_on_socket(
        self, specs: Sequence[_transfer.ChunkSpec], writer: _transfer.ChunkWriter
    ) -> AsyncGenerator[tuple[_transfer.ChunkSpec, _transfer.Written], None]:
        """Every chunk of ``specs`` asked for, read and written by the channel's thread
        (:meth:`_write_all`); yields each one's :class:`~dckpt._transfer.Written` as it
        is done. The event loop stands between no two chunks (see
        :mod:`dckpt._transfer._chunk_writer`)."""
        assert self._thread is not None
        loop = asyncio.get_running_loop()
        done: asyncio.Queue[Any] = asyncio.Queue()  # (spec, Written), then _END or an error

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(done.put_nowait, item)

        def run(buffer: bytearray) -> None:
            try:
                self._write_all(specs, writer, buffer, put)
            except BaseException as e:  # raised on the loop, by the generator
                put(e)
            else:
                put(_END)

        # Compressed chunks are received whole into it (the ring is touched on the loop).
        self._thread.submit(run, self._next_buffer())
        while True:
            item = await done.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            # A generator left early (an error, a cancellation) leaves the thread
            # reading: close() shuts the socket down, which ends it.

    def _write_all(
        self, specs: Sequence[_transfer.ChunkSpec], writer: _transfer.ChunkWriter,
        buffer: bytearray, put: Callable[[Any], None],
    ) -> None:
        """Ask for ``specs`` (``max-in-flight`` + 1 ahead, as :meth:`stream`) and write
        each as it comes, ``put((spec, written))`` after each (the channel's thread)."""
        sock = self._socket
        assert sock is not None
        asked = min(self.window + 1, len(specs))
        for spec in specs[:asked]:
            self._ask_on_socket(spec)
        for spec in specs:
            header, length = self._reply_on_socket(spec)
            if length == spec.length:  # raw: a compressed frame goes only if shorter
                # Only the reads are the socket's: a write's error (a full disk) is
                # raised as it is, not as a lost connection another holder could fix.
                timing = _Timing(sock, self._socket_errors, timed=not self._loopback)
                written = writer.raw(spec, header, timing.fill)
                self._link = link_rate(self._link, timing.bytes, timing.seconds)
            else:
                view = memoryview(buffer)[:length]
                with self._socket_errors():
                    _wire.recv_exactly(sock, view)
                written = writer.frame(spec, (header, view))
            if asked < len(specs):  # with the link as this chunk measured it
                self._ask_on_socket(specs[asked])
                asked += 1
            put((spec, written))

    def _ask_on_socket(self, spec: _transfer.ChunkSpec) -> None:
        assert self._socket is not None
        link = self._link if not self._loopback else None  # compress only where it pays
        self._socket.sendall(_wire.REQUEST.pack(_wire.Op.CHUNK, spec.file_index, spec.offset,
                                                spec.length, link or 0.0))

    def _reply_on_socket(self, spec: _transfer.ChunkSpec) -> tuple[bytes, int]:
        """The frame header of ``spec``'s reply and its payload's length, read from the
        taken socket (the channel's thread); the sender's error raised."""
        sock = self._socket
        assert sock is not None
        record = memoryview(bytearray(_wire.REPLY.size))
        with self._socket_errors():
            _wire.recv_exactly(sock, record)
            op, header_length, length = _wire.REPLY.unpack(record)
            if header_length > _MAX_HEADER:
                raise CheckpointFormatError(
                    f"{self.peer} announced a header of {header_length} bytes")
            header = bytearray(header_length)
            _wire.recv_exactly(sock, memoryview(header))
        if op == _wire.Op.ERROR:
            try:
                reply = json.loads(header)
            except ValueError:
                reply = None
            _wire.raise_error(reply, self.peer)
            raise CheckpointError(f"{self.peer} ended the transfer: {bytes(header)!r}")
        if op != _wire.Op.CHUNK:
            raise CheckpointFormatError(f"{self.peer} sent a reply of op {op}")
        return bytes(header), self._checked_length(length, spec)

    async def _receive(self, spec: _transfer.ChunkSpec) -> _transfer.Frame:
        """The frame of ``spec``, read from the comm."""
        reply = await self._read(self.comm.read())
        _wire.raise_error(reply, self.peer)
        if "header" in reply and "length" in reply and self._raw is not None:
            payload: Any = await self._read_raw(reply["length"], spec)
        elif "header" in reply and "payload" in reply:
            payload = reply.pop("payload")
        else:
            raise CheckpointFormatError(f"{self.peer} sent {sorted(reply)} for a chunk")
        return reply.pop("header"), payload

    def release_ring(self) -> list[bytearray]:
        """The ring's buffers, no longer this channel's."""
        ring, self._ring = self._ring, []
        return ring

    async def _ask(self, spec: _transfer.ChunkSpec, asked: list[_transfer.ChunkSpec]) -> None:
        if self._socket is not None:
            await self._on_socket(self._ask_on_socket, spec)
        else:
            link = self._link if not self._loopback else None  # compress only where it pays
            request: dict[str, Any] = {"chunk": [spec.file_index, spec.offset, spec.length],
                                       "raw": self._raw is not None}
            if link is not None:
                request["link"] = link
            await self.comm.write(request)
        asked.append(spec)

    async def _read_raw(self, length: object, spec: _transfer.ChunkSpec) -> memoryview:
        view = memoryview(self._next_buffer())[: self._checked_length(length, spec)]
        assert self._raw is not None
        started = time.perf_counter()
        try:
            # A memoryview works (distributed's own TCP.read passes them too).
            await self._read(self._raw.read_into(view))  # type: ignore[arg-type]
        except (StreamClosedError, ssl.SSLError) as e:
            raise CommClosedError(f"{self.peer} went away while sending a chunk: {e}") from e
        elapsed = time.perf_counter() - started
        self._link = link_rate(self._link, len(view), elapsed)
        return view

    def _checked_length(self, length: object, spec: _transfer.ChunkSpec) -> int:
        """``length``, which a reply announced for ``spec``, if it can be its frame's."""
        # A frame is never longer than its chunk: the header's length must match it.
        if not isinstance(length, int) or not 0 < length <= spec.length:
            raise CheckpointFormatError(f"{self.peer} announced {length!r} bytes for {spec}")
        return length

    def _next_buffer(self) -> bytearray:
        """The ring's buffer for the next chunk: a new one until the ring is full."""
        if len(self._ring) <= self.window:
            self._ring.append(RING_BUFFERS.take(self._chunk_bytes))
            return self._ring[-1]
        buffer = self._ring[self._next]
        self._next = (self._next + 1) % len(self._ring)
        return buffer

    async def _read(self, reading: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(reading, self.stall_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{self.peer} sent nothing for {self.stall_timeout:g} s "
                "(dckpt.transfer.stall-timeout)"
            ) from None


_LINK_SAMPLE_BYTES = 256 * 1024


_END = object()  # _write_on_socket: the thread is done


class _Timing:
    """Fills a raw chunk's pieces from a socket (:meth:`ChunkWriter.raw`'s ``fill``),
    timing the bytes that had not arrived yet: what came while this side was busy (the
    chunk's writes, the chunks before it) came at a rate nobody timed. (The sender reads
    ahead, so whole chunks can be waiting, which made a 1 Gbit/s link look like 3 GB/s.)
    Not ``timed``: no link to measure (a loopback), only the pieces filled."""

    def __init__(self, sock: socket.socket,
                 errors: Callable[[], contextlib.AbstractContextManager[None]],
                 timed: bool = True) -> None:
        self._sock = sock
        self._errors = errors  # what the socket's errors are raised as
        self._timed = timed
        self.bytes = 0
        self.seconds = 0.0

    def fill(self, view: memoryview) -> None:
        if self._timed:
            waiting = min(_wire.queued_bytes(self._sock), len(view))
            started = time.perf_counter()
        try:
            _wire.recv_exactly(self._sock, view)
        except OSError:
            # Entered only now: a context manager per piece (4096 per GiB) cost ~3 % of
            # the receiving thread, the transfer's bottleneck.
            with self._errors():
                raise
        if self._timed:
            self.seconds += time.perf_counter() - started
            self.bytes += len(view) - waiting


def link_rate(known: float | None, length: int, elapsed: float) -> float | None:
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
