"""dckpt.cluster._stream without a cluster: a directory across one comm in this process,
and the sender's guess of the chunk a receiver asks for next."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.config
import pytest
from distributed.comm import Comm, CommClosedError, connect, listen
from distributed.security import Security

import dckpt._transfer._receive as receive_module
import dckpt.cluster._chunk_receiver as receiver_module
import dckpt.cluster._wire as wire
from dckpt._transfer import (
    ChunkSource,
    ChunkSpec,
    ChunkWriter,
    build_manifest,
    decode_chunk,
    encode_parts,
)
from dckpt.cluster._chunk_receiver import link_rate
from dckpt.cluster._chunk_sender import _FileSender, _ReadAhead, next_chunk
from dckpt.cluster._stream import serve_chunks, stream_over
from dckpt.cluster._wire import is_loopback, raw_stream
from dckpt.errors import CheckpointFormatError


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1024, 1 << 20])
def test_following_walks_the_chunks_in_manifest_order(tmp_path: Path, chunk_bytes: int):
    rng = random.Random(3)
    for name, size in {"a": 0, "b": 1, "c": 2500, "d": 0, "e/f": 1024, "g": 7}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(rng.randbytes(size))
    manifest = build_manifest(tmp_path)
    expected = manifest.chunks(chunk_bytes)
    with ChunkSource(str(tmp_path), manifest, chunk_bytes) as source:
        walked = [expected[0]]
        while (step := next_chunk(source, walked[-1])) is not None:
            walked.append(step)
    assert walked == expected


def test_a_detached_sender_reads_ahead_without_an_event_loop(tmp_path: Path):
    """The thread of a detached socket waits for the reading thread itself (no turn of
    the event loop per chunk): from a thread with no loop at all, every chunk comes
    right, from its file or from a buffer, and nothing is read once it is closed."""
    rng = random.Random(5)
    for name, size in {"a": 2500, "b": 0, "c/d": 4096, "e": 7}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(rng.randbytes(size))
    manifest = build_manifest(tmp_path)
    chunk_bytes = 1024
    got: dict[ChunkSpec, bytes] = {}
    errors: list[BaseException] = []

    def serve(source: ChunkSource) -> None:
        reader = _ReadAhead(source)
        try:
            for i, spec in enumerate(manifest.chunks(chunk_bytes)):
                if i % 2:
                    header, region = reader.region_now(spec, 10)
                    try:
                        payload: Any = os.pread(region.fd, region.length, region.offset)
                    finally:
                        region.close()
                else:
                    header, payload, buffer = reader.read_now(spec, 0.0, 10)
                    payload = bytes(payload)
                    reader.give_back(buffer)
                got[spec] = bytes(decode_chunk((header, payload), spec))
            reader.close()
            with pytest.raises(CommClosedError):
                reader.region_now(manifest.chunks(chunk_bytes)[0], 10)
        except BaseException as e:  # raised in the test's thread below
            errors.append(e)

    with ChunkSource(str(tmp_path), manifest, chunk_bytes) as source:
        thread = threading.Thread(target=serve, args=(source,))
        thread.start()
        thread.join(60)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    files = {i: (tmp_path / e.path).read_bytes() for i, e in enumerate(manifest.files)}
    assert got and got == {spec: files[spec.file_index][spec.offset:spec.offset + spec.length]
                           for spec in manifest.chunks(chunk_bytes)}


def _tree(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(rng.randbytes(640 * 1024 + 3))
    (root / "sub" / "log.txt").write_bytes(b"loss 0.1\n" * 20_000)  # compresses
    (root / "empty").write_bytes(b"")


def _transfer(src: Path, manifest: Any, dst: Path, chunk_bytes: int, *,
              scheme: str = "tcp://127.0.0.1", source_class: type[ChunkSource] = ChunkSource,
              served: Callable[[Comm], Any] = lambda comm: comm,
              receiving: Callable[[Comm], Any] = lambda comm: comm,
              detach: bool = False) -> list[Any]:
    """Copy ``src`` to ``dst`` across one comm of ``scheme`` in this process: a listener
    serves chunks of a ``source_class`` on ``served(comm)``, a connection receives on
    ``receiving(comm)`` (``detach``: on the socket taken from it, where it can be). The
    sources, the receivers' comms, and what the sender raised, if anything:
    ``[source, comm, error]``."""
    seen: list[Any] = []
    raised: list[BaseException | None] = [None]

    async def main() -> None:
        async def serve(comm: Comm) -> None:
            with source_class(str(src), manifest, chunk_bytes) as source:
                seen.insert(0, source)
                try:
                    await serve_chunks(served(comm), source)
                except Exception as e:  # noqa: BLE001 - the test looks at it
                    raised[0] = e
            await comm.close()

        listen_args, connect_args = _security_for(scheme)
        listener = await listen(scheme, serve, **listen_args)  # awaiting one starts it
        try:
            comm = receiving(await connect(listener.contact_address, **connect_args))
            seen.append(comm)
            await stream_over(comm, "the test sender", manifest, str(dst), chunk_bytes=chunk_bytes,
                              detach=detach)
            await comm.close()
        finally:
            listener.stop()

    asyncio.run(main())
    return [*seen, raised[0]]


def _spy_on_take_socket(monkeypatch: pytest.MonkeyPatch) -> list[Comm]:
    """The comms whose socket is taken from now on, in this process."""
    taken: list[Comm] = []
    real = wire.take_socket

    def take_socket(comm: Comm) -> socket.socket:
        taken.append(comm)
        return real(comm)

    monkeypatch.setattr(wire, "take_socket", take_socket)
    return taken


@pytest.mark.parametrize("detach", [False, True], ids=["comm", "detach"])
@pytest.mark.parametrize("in_flight", [1, 3])
@pytest.mark.parametrize("scheme", ["tcp://127.0.0.1", "tls://127.0.0.1", "inproc://"])
def test_a_directory_crosses_a_comm_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           scheme: str, in_flight: int, detach: bool):
    """Raw chunk bytes after a message on TCP and TLS, chunks inside messages elsewhere,
    or (detach) on the bare socket of a TCP comm; with no retries allowed, a buffer
    reused too early would fail the transfer."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, seed=in_flight)
    manifest = build_manifest(src)
    used_raw: list[bool] = []

    def receiving(comm: Comm) -> Comm:
        used_raw.append(raw_stream(comm) is not None)
        return comm

    taken = _spy_on_take_socket(monkeypatch)
    with dask.config.set({"dckpt.transfer.max-in-flight": in_flight,
                          "dckpt.transfer.retries": 0}):
        *_, raised = _transfer(src, manifest, dst, 64 * 1024, scheme=scheme,
                               receiving=receiving, detach=detach)
    assert raised is None
    assert used_raw == [not scheme.startswith("inproc")]
    # Only a plain TCP comm gives up its socket: on both sides.
    assert len(taken) == (2 if detach and scheme.startswith("tcp") else 0)
    for name in ("weights.bin", "sub/log.txt", "empty"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()


class _CountingSource(ChunkSource):
    """A ChunkSource that counts how its chunks were read: into buffers or as regions."""

    parts = 0
    regions = 0

    def read_parts(self, *args: Any, **kwargs: Any) -> Any:
        self.parts += 1
        return super().read_parts(*args, **kwargs)

    def read_region(self, *args: Any, **kwargs: Any) -> Any:
        self.regions += 1
        return super().read_region(*args, **kwargs)


@pytest.mark.parametrize("detach", [False, True], ids=["comm", "detach"])
@pytest.mark.parametrize("scheme", ["tcp://127.0.0.1", "tls://127.0.0.1", "inproc://"])
def test_on_plain_tcp_chunks_go_from_the_file_to_the_socket(tmp_path: Path, scheme: str,
                                                             detach: bool):
    """No chunk of an uncompressed transfer is read into a buffer on TCP (os.sendfile),
    on the comm or on its bare socket; TLS and in-process comms, which sendfile cannot
    feed, read each into one."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, seed=7)
    manifest = build_manifest(src)
    chunk_bytes = 64 * 1024
    with dask.config.set({"dckpt.transfer.compression": "none", "dckpt.transfer.retries": 0}):
        source, _, _ = _transfer(src, manifest, dst, chunk_bytes, scheme=scheme,
                                 source_class=_CountingSource, detach=detach)
    for name in ("weights.bin", "sub/log.txt", "empty"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    chunks = len(manifest.chunks(chunk_bytes))
    if scheme.startswith("tcp"):
        assert (source.regions, source.parts) == (chunks, 0)
    else:
        assert (source.regions, source.parts) == (0, chunks)


def test_a_region_has_the_header_of_its_uncompressed_frame(tmp_path: Path):
    data = random.Random(4).randbytes(3 * 1024 * 1024 + 5)  # more than one checksum block
    (tmp_path / "data").write_bytes(data)
    manifest = build_manifest(tmp_path)
    spec = ChunkSpec(0, 7, len(data) - 7)
    with ChunkSource(str(tmp_path), manifest, len(data)) as source:
        header, region = source.read_region(spec)
        with region:
            assert header == encode_parts(data[7:], compress=False)[0]
            assert (region.offset, region.length) == (7, len(data) - 7)
            assert os.pread(region.fd, 5, region.offset) == data[7:12]
        os.truncate(tmp_path / "data", 1000)
        with pytest.raises(CheckpointFormatError, match=r"ends at byte 1000"):
            source.read_region(spec)


def test_a_file_cut_short_while_it_is_sent_ends_the_send(tmp_path: Path):
    """sendfile returning 0 before the region's end: the file shrank after its checksum;
    the send fails at once instead of leaving the receiver waiting."""
    data = random.Random(5).randbytes(256 * 1024)
    (tmp_path / "data").write_bytes(data)
    manifest = build_manifest(tmp_path)
    left, right = socket.socketpair()
    left.setblocking(False)

    async def main() -> None:
        from tornado.iostream import IOStream

        stream = IOStream(left)
        sender = _FileSender(left, stall_timeout=10)
        with ChunkSource(str(tmp_path), manifest, len(data)) as source:
            _, region = source.read_region(ChunkSpec(0, 0, len(data)))
            os.truncate(tmp_path / "data", 1000)
            with pytest.raises(CheckpointFormatError, match=r"ends at byte 1000, within a chunk"):
                await sender.send(stream, region)
        sender.close()
        stream.close()

    try:
        asyncio.run(main())
        assert right.recv(2000) == data[:1000]
    finally:
        right.close()


def _security_for(scheme: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Listen and connect arguments: a throwaway certificate for TLS, none otherwise."""
    if not scheme.startswith("tls"):
        return {}, {}
    pytest.importorskip("cryptography")  # Security.temporary() makes the certificate
    security = Security.temporary()
    return security.get_listen_args("worker"), security.get_connection_args("worker")


@pytest.fixture
def lz4_speed_of_a_fresh_process(monkeypatch: pytest.MonkeyPatch) -> float:
    """lz4's speed as a fresh process assumes it: the estimate is a running average over
    what this process compressed, and other tests compress zeros (at ~7 GB/s)."""
    import dckpt._formats._frames as frames

    monkeypatch.setattr(frames, "_compress_speed", frames._COMPRESS_PRIOR)
    return frames._COMPRESS_PRIOR


class _Recording:
    """A comm that keeps what passes through it (the sender's side of a test)."""

    def __init__(self, comm: Comm) -> None:
        self._comm = comm
        self.requests: list[dict[str, Any]] = []
        self.flags: list[int] = []
        self.stream = comm.stream  # type: ignore[attr-defined]

    async def read(self) -> Any:
        message = await self._comm.read()
        self.requests.append(dict(message))
        return message

    async def write(self, message: Any) -> Any:
        if isinstance(message, dict) and "header" in message:
            self.flags.append(message["header"][0])
        return await self._comm.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)


@pytest.mark.parametrize("over_a_link", [True, False], ids=["link", "loopback"])
def test_the_receiver_reports_its_link_and_a_fast_one_gets_no_compression(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lz4_speed_of_a_fresh_process: float,
    over_a_link: bool,
):
    """Zeros compress 100-fold, yet over loopback (faster than lz4) sending them raw is
    quicker: the sender compresses only where the link the receiver measures makes it pay.

    The "link" is given the rate of a fast one (10 GB/s) rather than timed: a timed
    loopback is as slow as the machine's worst moment (a VM suspended mid-chunk timed
    one as a slow link, and a chunk went compressed). Timing itself:
    test_the_link_is_as_fast_as_its_fastest_chunk."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "zeros.bin").write_bytes(bytes(4 << 20))
    manifest = build_manifest(src)
    chunk_bytes = 512 * 1024
    seen: list[_Recording] = []

    def served(comm: Comm) -> _Recording:
        seen.append(_Recording(comm))
        return seen[-1]

    # The recording wrapper is no TCP comm: let the sender see the stream beneath it.
    real = wire.raw_stream
    monkeypatch.setattr(wire, "raw_stream",
                        lambda c: real(c._comm if isinstance(c, _Recording) else c))
    if over_a_link:  # as if 127.0.0.1 were another machine's address
        monkeypatch.setattr(wire, "is_loopback", lambda address: False)
        monkeypatch.setattr(receiver_module, "link_rate", lambda known, length, elapsed: 10e9)
    with dask.config.set({"dckpt.transfer.compression": "auto"}):
        _transfer(src, manifest, dst, chunk_bytes, served=served)
    assert (dst / "zeros.bin").read_bytes() == bytes(4 << 20)
    [recording] = seen
    links = [r["link"] for r in recording.requests if "link" in r]
    if over_a_link:
        assert links and all(rate > 0 for rate in links)
    else:
        assert links == []  # nothing to measure: the sender never compresses
    assert recording.flags and set(recording.flags) == {0}


@pytest.mark.parametrize("address, loopback", [
    ("tcp://127.0.0.1:8786", True), ("tcp://127.0.5.1:1", True), ("tcp://[::1]:8786", True),
    ("tls://localhost:1", True), ("tcp://10.0.0.2:8786", False), ("tcp://node-1:1", False),
    ("inproc://10.1.2.3/1/2", False),
])
def test_a_loopback_peer_is_no_link(address: str, loopback: bool):

    assert is_loopback(address) is loopback


@pytest.mark.parametrize("in_flight", [1, 3])
def test_the_receivers_chunk_buffers_serve_the_next_transfer_and_stay_few(
    tmp_path: Path, in_flight: int
):
    """Three transfers in a row reuse the first one's ring of buffers (fresh memory is
    slow where glibc returns it at once), and the process keeps two chunks at most."""
    src = tmp_path / "src"
    _tree(src, seed=11)
    manifest = build_manifest(src)
    chunk_bytes = 64 * 1024
    pool = receiver_module.RING_BUFFERS
    pool.give([])  # nothing from earlier tests of this process matters: the limit does
    rings: list[set[int]] = []

    async def main() -> None:
        async def serve(comm: Comm) -> None:
            with ChunkSource(str(src), manifest, chunk_bytes) as source:
                await serve_chunks(comm, source)
            await comm.close()

        listener = await listen("tcp://127.0.0.1", serve)
        try:
            for round_ in range(3):
                comm = await connect(listener.contact_address)
                await stream_over(comm, "the test sender", manifest,
                                  str(tmp_path / f"dst{round_}"), chunk_bytes=chunk_bytes)
                rings.append({id(b) for b in pool._free})
                await comm.close()
        finally:
            listener.stop()

    with dask.config.set({"dckpt.transfer.max-in-flight": in_flight}):
        asyncio.run(main())
    for round_ in range(3):
        assert (tmp_path / f"dst{round_}" / "weights.bin").read_bytes() == (
            src / "weights.bin").read_bytes()
    assert pool.held() == 2 * chunk_bytes
    assert rings[0] == rings[1] == rings[2]  # the same two buffers each time


class _Asking:
    """The receiver's comm, counting the chunk requests not yet answered."""

    def __init__(self, comm: Comm) -> None:
        self._comm = comm
        self.waiting = 0
        self.most = 0

    async def write(self, message: Any) -> Any:
        if isinstance(message, dict) and "chunk" in message:
            self.waiting += 1
            self.most = max(self.most, self.waiting)
        return await self._comm.write(message)

    async def read(self) -> Any:
        message = await self._comm.read()
        if isinstance(message, dict) and "header" in message:
            self.waiting -= 1
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)


@pytest.mark.parametrize("scheme, most", [("tcp://127.0.0.1", 2), ("inproc://", 1)])
def test_raw_chunks_are_asked_for_one_beyond_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, most: int
):
    """On TCP a chunk asked for waits in the kernel's buffers, not in memory: one more
    request than max-in-flight keeps the sender busy between two chunks. A comm whose
    answers are messages gets no more than the window."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, seed=12)
    manifest = build_manifest(src)
    chunk_bytes = 64 * 1024
    real = wire.raw_stream
    monkeypatch.setattr(wire, "raw_stream",
                        lambda c: real(c._comm if isinstance(c, _Asking) else c))
    with dask.config.set({"dckpt.transfer.max-in-flight": 1}):
        _, asking, _ = _transfer(src, manifest, dst, chunk_bytes, scheme=scheme,
                                 receiving=_Asking)
    assert (dst / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert asking.most == most and asking.waiting == 0


def test_the_link_is_as_fast_as_its_fastest_chunk():
    """A chunk that waited for a core says nothing about the link: one slow chunk after
    fast ones must not make a loopback look like a 1 Gbit/s link (compression would
    follow, and only cost)."""

    rate = None
    for elapsed in (0.004, 0.005, 0.2, 0.3):  # 8 MiB: ~2 GB/s twice, then two stalls
        rate = link_rate(rate, 8 << 20, elapsed)
    assert rate == pytest.approx((8 << 20) / 0.004)
    assert link_rate(None, 1000, 1.0) is None  # too short to time a link by


def test_compression_pays_on_a_slow_link_only(lz4_speed_of_a_fresh_process: float):
    from dckpt._transfer import max_ratio_for_link

    assert max_ratio_for_link(125e6) > 0.5  # 1 Gbit/s: halving the bytes pays
    assert max_ratio_for_link(100e9) == 0  # faster than lz4: never
    assert max_ratio_for_link(1e3) == pytest.approx(0.9, abs=1e-3)  # capped
    assert max_ratio_for_link(125e6) > max_ratio_for_link(400e6)


# A chunk's buffer is not read into again before its write is done, in whatever order the
# writes end (the receiver's ring of buffers, written by receive_directory's threads).
_BUFFER_TEST_CHUNK = 64 * 1024
_BUFFER_TEST_IN_FLIGHT = 3


def test_a_slow_first_write_keeps_its_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The first chunk's write waits while the later ones finish: with FIRST_COMPLETED
    the receiver read chunk 5 into chunk 1's buffer (a ring of _BUFFER_TEST_IN_FLIGHT + 1) before
    chunk 1 was written, and wrote chunk 5's bytes at chunk 1's place (seen once in a
    full run: a file whose bytes did not hash to its manifest's hash). On the comm only:
    on the taken socket each chunk is written by the thread that reads it before it
    reads the next (ChunkWriter), so no buffer is read into while written."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    # A file a chunk: writes of one file wait for each other (its hash is taken in
    # order), those of different files do not.
    for i in range(8):
        (src / f"shard-{i}.bin").write_bytes(bytes([i]) * _BUFFER_TEST_CHUNK)
    manifest = build_manifest(src)
    first, fifth = (manifest.files.index(next(e for e in manifest.files
                                               if e.path == f"shard-{i}.bin")) for i in (0, 4))
    fifth_written = threading.Event()
    real = receive_module._write_chunk

    def write(frame: Any, spec: Any, *args: Any) -> None:
        if spec.file_index == first:
            # Until chunk 5 is written, or long enough for it to be had if the receiver
            # would read it now: the pass of a correct receiver costs this wait.
            fifth_written.wait(timeout=2)
        real(frame, spec, *args)
        if spec.file_index == fifth:
            fifth_written.set()

    monkeypatch.setattr(receive_module, "_write_chunk", write)

    with dask.config.set({"dckpt.transfer.max-in-flight": _BUFFER_TEST_IN_FLIGHT,
                          "dckpt.transfer.retries": 0}):
        _transfer(src, manifest, dst, _BUFFER_TEST_CHUNK)
    for i in range(8):
        assert (dst / f"shard-{i}.bin").read_bytes() == bytes([i]) * _BUFFER_TEST_CHUNK


# --- on the socket taken from a comm ------------------------------------------------------


def test_on_the_socket_the_measured_link_chooses_compression(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lz4_speed_of_a_fresh_process: float
):
    """The receiver's link rate reaches the sender in its requests on the bare socket
    too: on a slow link (as the receiver measures it) the zeros go compressed once a
    chunk was timed; the two asked for before (one beyond the window) go raw."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "zeros.bin").write_bytes(bytes(2 << 20))
    manifest = build_manifest(src)
    chunk_bytes = 512 * 1024
    monkeypatch.setattr(wire, "is_loopback", lambda address: False)
    monkeypatch.setattr(receiver_module, "link_rate", lambda known, length, elapsed: 1e6)
    flags: list[int] = []
    real = receive_module._write_chunk

    real_raw = ChunkWriter.raw

    def write(frame: Any, *args: Any) -> None:  # a frame received whole
        flags.append(frame[0][0])  # the header's first byte: 1 for lz4
        real(frame, *args)

    def raw(self: ChunkWriter, spec: Any, header: bytes, fill: Any) -> Any:  # as it lands
        flags.append(header[0])
        return real_raw(self, spec, header, fill)

    monkeypatch.setattr(receive_module, "_write_chunk", write)
    monkeypatch.setattr(ChunkWriter, "raw", raw)
    taken = _spy_on_take_socket(monkeypatch)
    with dask.config.set({"dckpt.transfer.compression": "auto",
                          "dckpt.transfer.max-in-flight": 1}):
        *_, raised = _transfer(src, manifest, dst, chunk_bytes, detach=True)
    assert raised is None and len(taken) == 2
    assert (dst / "zeros.bin").read_bytes() == bytes(2 << 20)
    assert flags == [0, 0, 1, 1]


class _RefusingSource(ChunkSource):
    """A ChunkSource whose third chunk cannot be read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def read_region(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 3:
            raise CheckpointFormatError("the third chunk is unreadable")
        return super().read_region(*args, **kwargs)


def test_on_the_socket_a_sender_error_reaches_the_receiver_as_its_type(tmp_path: Path):
    """An error record on the bare socket: the receiver raises the sender's error, of
    the same type and with its message, and leaves no partial directory behind."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, seed=13)
    manifest = build_manifest(src)
    with dask.config.set({"dckpt.transfer.compression": "none", "dckpt.transfer.retries": 0}), \
            pytest.raises(CheckpointFormatError, match=r"the test sender: the third chunk"):
        _transfer(src, manifest, dst, 64 * 1024, source_class=_RefusingSource, detach=True)
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


class _StallingSource(ChunkSource):
    """A ChunkSource whose second chunk waits until :attr:`release` is set."""

    release = threading.Event()

    def read_region(self, spec: Any, *args: Any, **kwargs: Any) -> Any:
        if spec.offset > 0:
            self.release.wait(timeout=60)
        return super().read_region(spec, *args, **kwargs)


def test_on_the_socket_a_sender_that_stalls_ends_in_a_timeout_that_names_its_setting(
    tmp_path: Path
):
    """Whichever side's stall timeout runs out first (the same setting on both), the
    receiver raises a TimeoutError that names the setting."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "data").write_bytes(random.Random(14).randbytes(256 * 1024))
    manifest = build_manifest(src)
    _StallingSource.release.clear()
    try:
        with dask.config.set({"dckpt.transfer.compression": "none",
                              "dckpt.transfer.stall-timeout": "0.5s"}), \
                pytest.raises(TimeoutError, match=r"0.5 s \(dckpt.transfer.stall-timeout\)"):
            _transfer(src, manifest, dst, 64 * 1024, source_class=_StallingSource, detach=True)
    finally:
        _StallingSource.release.set()
    assert not dst.exists()


class _MisdirectingSource(ChunkSource):
    """A ChunkSource that sends its second chunk once with the first chunk's bytes
    (behind the second's header): wrong bytes, as a disk that returned others would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = 0  # of the second chunk

    def read_region(self, spec: Any, *args: Any, **kwargs: Any) -> Any:
        header, region = super().read_region(spec, *args, **kwargs)
        if spec.offset > 0 and spec.offset == spec.length:
            self.sent += 1
            if self.sent == 1:
                region.offset = 0
        return header, region


def test_on_the_socket_a_chunk_written_with_wrong_bytes_is_fetched_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A raw chunk on the taken socket is written as it lands and checked at its end:
    one whose bytes fail their checksum is fetched again and written over, and its
    file's hash, which took the wrong bytes in, is read back from the file (a hash
    kept from the stream would not match the manifest, and the receive would fail)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    chunk_bytes = 64 * 1024
    data = random.Random(15).randbytes(4 * chunk_bytes)
    (src / "data").write_bytes(data)
    manifest = build_manifest(src)
    with dask.config.set({"dckpt.transfer.compression": "none", "dckpt.transfer.retries": 1}):
        source, *_, raised = _transfer(src, manifest, dst, chunk_bytes,
                                       source_class=_MisdirectingSource, detach=True)
    assert raised is None
    assert source.sent == 2  # the wrong bytes, then the right ones
    assert (dst / "data").read_bytes() == data
    assert any("fetching it again" in r.getMessage() for r in caplog.records)


def test_on_the_socket_a_full_disk_is_raised_as_itself(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    """A write that fails on the receiver's disk is that disk's error, not a lost
    connection: another holder cannot fix it (the reads and the writes of a chunk share
    one thread on the taken socket)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, seed=16)
    manifest = build_manifest(src)

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with dask.config.set({"dckpt.transfer.compression": "none"}), \
            pytest.raises(OSError) as info:
        _transfer(src, manifest, dst, 64 * 1024, detach=True)
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, CommClosedError)
    assert not dst.exists()


def test_a_chunk_on_the_socket_times_only_the_bytes_it_waited_for(
    monkeypatch: pytest.MonkeyPatch
):
    """A raw chunk written as it lands is timed piece by piece, leaving out what had
    arrived while its writes ran: those bytes came at a rate nobody timed."""
    left, right = socket.socketpair()
    try:
        left.sendall(b"x" * 1000)  # all of it there before the chunk is read
        timing = receiver_module._Timing(right, contextlib.nullcontext)
        timing.fill(memoryview(bytearray(600)))
        timing.fill(memoryview(bytearray(400)))
        assert timing.bytes == 0
        # Of a piece of 600 with 100 waiting, 500 were waited for.
        monkeypatch.setattr(wire, "queued_bytes", lambda sock: 100)
        left.sendall(b"y" * 600)
        timing.fill(memoryview(bytearray(600)))
        assert timing.bytes == 500 and timing.seconds > 0
    finally:
        left.close()
        right.close()


def test_the_bytes_queued_on_a_socket_are_known_before_it_is_read():
    """What the receiver leaves out of a chunk's timing: bytes that came while it was
    busy elsewhere (a whole chunk the sender read ahead would time as a fast link)."""
    left, right = socket.socketpair()
    try:
        assert wire.queued_bytes(right) == 0
        left.sendall(b"x" * 1000)
        wire.recv_exactly(right, memoryview(bytearray(10)))
        assert wire.queued_bytes(right) == 990
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("error, raised", [
    (TimeoutError("slow"), TimeoutError), (PermissionError("no"), PermissionError),
    (CheckpointFormatError("bad"), CheckpointFormatError), (RuntimeError("odd"), Exception),
])
def test_an_error_reply_is_raised_on_the_other_side_as_its_kind(error: Exception,
                                                                raised: type[Exception]):
    """A sender's timeout arrives as a TimeoutError (another holder may do better), not
    as a bare CheckpointError; what has no kind of its own, as a CheckpointError."""
    from dckpt.errors import CheckpointError

    with pytest.raises(raised, match=f"the sender: {error}") as caught:
        wire.raise_error(wire.error_reply(error), "the sender")
    if raised is Exception:
        assert type(caught.value) is CheckpointError
