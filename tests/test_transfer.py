"""dckpt._transfer: manifests, chunk frames, the sender's ChunkSource, receive_directory.

Real files in ``tmp_path``; the "network" is an async function that calls the
sender's ``read_chunk``, sometimes damaging what it returns, turned into the stream
that ``receive_directory`` asks (:func:`stream_of`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import random
import shutil
import stat
import time
import tracemalloc
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import dask.config
import msgpack
import pytest
import xxhash
from fsspec.callbacks import Callback

from dckpt._transfer import (
    CHUNK_HEADER,
    ChunkSource,
    ChunkSpec,
    ChunkStream,
    FileEntry,
    Manifest,
    ReceiveProgress,
    build_manifest,
    content_digest,
    decode_chunk,
    encode_chunk,
    encode_parts,
    receive_directory,
    receiving,
)
from dckpt._transfer._hashes import file_hash, hash_file
from dckpt.errors import CheckpointFormatError, CorruptChunkError, UnsafePathError

KiB = 1 << 10
MiB = 1 << 20
Fetch = Callable[[ChunkSpec], Awaitable[bytes]]


# --- helpers ---------------------------------------------------------------------------


def make_tree(root: Path) -> Path:
    """Nested folders, an empty folder and file, random and compressible data, an
    executable, an in-tree symlink."""
    rng = random.Random(0)
    (root / "model" / "layers" / "deep").mkdir(parents=True)
    (root / "empty_dir").mkdir()
    (root / "empty_file").write_bytes(b"")
    (root / "model" / "weights.bin").write_bytes(rng.randbytes(5 * MiB))
    (root / "model" / "layers" / "text.log").write_bytes(b"epoch 1 loss 0.25\n" * (3 * MiB // 18))
    (root / "model" / "layers" / "deep" / "small.json").write_text('{"units": [4, 4]}')
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    (root / "model" / "latest").symlink_to("weights.bin")
    return root


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """``relpath -> ("dir",) | ("file", sha256, mode) | ("link", target)``, no following."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                            stat.S_IMODE(st.st_mode))
    return out


def inline_fetch(source: ChunkSource) -> Fetch:
    async def fetch(spec: ChunkSpec) -> bytes:
        return source.read_chunk(spec)
    return fetch


def threaded_fetch(source: ChunkSource) -> Fetch:
    async def fetch(spec: ChunkSpec) -> bytes:
        return await asyncio.to_thread(source.read_chunk, spec)
    return fetch


def stream_of(fetch: Fetch) -> ChunkStream:
    """A stream that fetches the chunks asked for one by one, in the order asked."""
    async def stream(specs: Sequence[ChunkSpec]) -> AsyncIterator[tuple[ChunkSpec, bytes]]:
        for spec in specs:
            yield spec, await fetch(spec)
    return stream


def flip_payload_byte(frame: bytes) -> bytes:
    damaged = bytearray(frame)
    damaged[CHUNK_HEADER.size + (len(frame) - CHUNK_HEADER.size) // 2] ^= 0xFF
    return bytes(damaged)


def copy(
    src: Path,
    dst: Path,
    *,
    chunk_bytes: int,
    wrap: Callable[[Fetch], Fetch] = lambda fetch: fetch,
    fetcher: Callable[[ChunkSource], Fetch] = inline_fetch,
    **kwargs: Any,
) -> Manifest:
    manifest = build_manifest(src)
    with ChunkSource(str(src), manifest, chunk_bytes) as source:
        asyncio.run(receive_directory(
            manifest, stream_of(wrap(fetcher(source))), dst, chunk_bytes=chunk_bytes, **kwargs
        ))
    return manifest


class RecordingCallback(Callback):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.updates: list[int] = []

    def set_size(self, size: int) -> None:
        self.sizes.append(size)

    def relative_update(self, inc: int = 1) -> None:
        self.updates.append(inc)


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("fetcher", [inline_fetch, threaded_fetch], ids=["inline", "thread"])
def test_round_trip_is_byte_identical(tmp_path: Path, fetcher: Callable[[ChunkSource], Fetch]):
    src = make_tree(tmp_path / "src")
    dst = tmp_path / "out" / "dst"
    callback = RecordingCallback()
    manifest = copy(src, dst, chunk_bytes=1 * MiB, fetcher=fetcher, callback=callback)

    assert snapshot(dst) == snapshot(src)
    assert os.readlink(dst / "model" / "latest") == "weights.bin"
    assert stat.S_IMODE(os.stat(dst / "run.sh").st_mode) == 0o755
    assert (dst / "empty_dir").is_dir() and (dst / "empty_file").read_bytes() == b""
    on_disk = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert callback.sizes == [manifest.total_bytes] == [on_disk]
    assert sum(callback.updates) == manifest.total_bytes
    assert len(callback.updates) == len(manifest.chunks(1 * MiB))
    assert os.listdir(tmp_path / "out") == ["dst"]  # no partial sibling left


def test_files_of_exact_chunk_multiples_and_tiny_chunks(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    sizes = {"zero": 0, "one": 1, "below": KiB - 1, "exact": KiB, "above": KiB + 1,
             "three": 3 * KiB, "many": 50 * KiB + 7}
    rng = random.Random(1)
    for name, size in sizes.items():
        (src / name).write_bytes(rng.randbytes(size))

    manifest = build_manifest(src)
    chunks = manifest.chunks(KiB)
    by_file = collections.defaultdict(list)
    for spec in chunks:
        by_file[manifest.files[spec.file_index].path].append((spec.offset, spec.length))
    assert "zero" not in by_file
    assert by_file["exact"] == [(0, KiB)]
    assert by_file["above"] == [(0, KiB), (KiB, 1)]
    assert by_file["three"] == [(0, KiB), (KiB, KiB), (2 * KiB, KiB)]
    assert by_file["one"] == [(0, 1)]
    for name, size in sizes.items():
        assert sum(length for _, length in by_file.get(name, [])) == size

    copy(src, tmp_path / "dst", chunk_bytes=KiB)
    assert snapshot(tmp_path / "dst") == snapshot(src)
    with pytest.raises(ValueError, match="chunk size 0 is not an integer between 1"):
        manifest.chunks(0)


def test_a_tree_without_file_contents_needs_no_chunk(tmp_path: Path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "empty").write_bytes(b"")
    (src / "link").symlink_to("a/b")
    manifest = copy(src, tmp_path / "dst", chunk_bytes=KiB)
    assert manifest.chunks(KiB) == [] and manifest.total_bytes == 0
    assert snapshot(tmp_path / "dst") == snapshot(src)


def test_receive_replaces_an_existing_target(tmp_path: Path):
    src = make_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("from before")
    copy(src, dst, chunk_bytes=4 * MiB)
    assert snapshot(dst) == snapshot(src)
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


def test_in_place_fills_the_given_directory_and_stages_nothing_beside_it(tmp_path: Path):
    """A node cache stages a transfer once: in place, the directory the caller staged
    is filled as it is (no sibling, no rename), and one that is not empty is refused."""
    src = make_tree(tmp_path / "src")
    staged = tmp_path / "staged"
    staged.mkdir()
    inode = staged.stat().st_ino
    copy(src, staged, chunk_bytes=MiB, in_place=True)
    assert snapshot(staged) == snapshot(src)
    assert staged.stat().st_ino == inode  # the very directory, not one renamed over it
    assert sorted(os.listdir(tmp_path)) == ["src", "staged"]
    with pytest.raises(ValueError, match="not empty"):
        copy(src, staged, chunk_bytes=MiB, in_place=True)


def test_settings_are_read_when_not_passed(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(random.Random(2).randbytes(10 * KiB))
    manifest = build_manifest(src)
    seen: list[ChunkSpec] = []
    with dask.config.set({"dckpt.transfer.chunk-bytes": "4KiB"}):
        source = ChunkSource(str(src), manifest)
        assert source.chunk_bytes == 4 * KiB

        async def fetch(spec: ChunkSpec) -> bytes:
            seen.append(spec)
            return source.read_chunk(spec)

        asyncio.run(receive_directory(manifest, stream_of(fetch), tmp_path / "dst"))
    assert sorted(spec.length for spec in seen) == [2 * KiB, 4 * KiB, 4 * KiB]
    assert (tmp_path / "dst" / "data").read_bytes() == (src / "data").read_bytes()


# --- chunk frames ----------------------------------------------------------------------


def test_compression_decision():
    spec = ChunkSpec(0, 0, MiB)
    noise = random.Random(3).randbytes(MiB)
    zeros = bytes(MiB)

    raw_frame = encode_chunk(noise)
    assert CHUNK_HEADER.unpack(raw_frame[: CHUNK_HEADER.size])[:2] == (0, MiB)
    assert len(raw_frame) == CHUNK_HEADER.size + MiB
    zero_frame = encode_chunk(zeros)
    assert CHUNK_HEADER.unpack(zero_frame[: CHUNK_HEADER.size])[:2] == (1, MiB)
    assert len(zero_frame) < MiB // 100

    assert bytes(decode_chunk(raw_frame, spec)) == noise
    assert bytes(decode_chunk(zero_frame, spec)) == zeros
    # Forced either way, and into a caller's buffer.
    forced = encode_chunk(noise, compress=True)
    assert forced[0] == 1
    out = bytearray(2 * MiB)
    assert bytes(decode_chunk(forced, spec, memoryview(out))) == noise
    assert out[:MiB] == noise
    assert encode_chunk(zeros, compress=False)[0] == 0
    with pytest.raises(ValueError, match="out holds 10 bytes"):
        decode_chunk(raw_frame, spec, bytearray(10))


def test_half_compressible_chunk_goes_by_its_sample():
    # Text in the middle (where the sample is taken) and noise around it.
    noise = random.Random(4).randbytes(MiB)
    mixed = noise[: 3 * MiB // 8] + b"abcd" * (MiB // 16) + noise[: 3 * MiB // 8]
    frame = encode_chunk(mixed)
    assert frame[0] == 1 and len(frame) < 0.8 * len(mixed)
    assert bytes(decode_chunk(frame, ChunkSpec(0, 0, len(mixed)))) == mixed


@pytest.mark.parametrize("setting, flag", [("none", 0), ("lz4", 1), ("auto", 1)])
def test_compression_setting(setting: str, flag: int):
    with dask.config.set({"dckpt.transfer.compression": setting}):
        assert encode_chunk(bytes(64 * KiB))[0] == flag
        assert encode_chunk(bytes(64 * KiB), compress=False)[0] == 0


def test_unknown_compression_setting_is_refused():
    with dask.config.set({"dckpt.transfer.compression": "zstd"}):
        with pytest.raises(ValueError, match="dckpt.transfer.compression is 'zstd'"):
            encode_chunk(b"abc")


def _damaged_frames() -> list[tuple[str, bytes, str]]:
    data = b"hello world " * 1000
    good_raw = encode_chunk(data, compress=False)
    good_lz4 = encode_chunk(data, compress=True)
    H = CHUNK_HEADER.size
    _, length, crc = CHUNK_HEADER.unpack(good_raw[:H])
    return [
        ("truncated header", good_raw[:5], "its header is 5 bytes, not 17"),
        ("truncated payload", good_raw[:-1], "payload is 11999 bytes"),
        ("unknown flags", CHUNK_HEADER.pack(0x80, length, crc) + good_raw[H:], "unknown flags"),
        ("other length", CHUNK_HEADER.pack(0, length + 1, crc) + good_raw[H:], "not 12000"),
        ("flipped byte", flip_payload_byte(good_raw), "checksum"),
        ("bad checksum", CHUNK_HEADER.pack(0, length, crc ^ 1) + good_raw[H:], "checksum"),
        ("bad lz4", good_lz4[:H] + b"\xff" * (len(good_lz4) - H), "lz4 block"),
        ("short lz4", CHUNK_HEADER.pack(1, length, crc) + encode_chunk(data[:-10], compress=True)[H:],
         "decompresses to 11990 bytes"),
    ]


@pytest.mark.parametrize("frame, match", [(f, m) for _, f, m in _damaged_frames()],
                         ids=[name for name, _, _ in _damaged_frames()])
def test_damaged_frames_are_refused(frame: bytes, match: str):
    with pytest.raises(CorruptChunkError, match=match) as info:
        decode_chunk(frame, ChunkSpec(7, 123 * KiB, 12000))
    assert "file #7 at offset 125952" in str(info.value)


def test_a_raw_header_gives_its_checksum_and_refuses_any_other_frame():
    """What a receiver that checks a payload as it streams in reads off the header: the
    checksum of an uncompressed frame of the length asked for, else a named error."""
    from dckpt._formats import CHUNK_HEADER, raw_header_checksum

    data = b"abc" * 1000
    header, _ = encode_parts(data, compress=False)
    assert raw_header_checksum(header, len(data)) == xxhash.xxh3_64_intdigest(data)
    compressed, _ = encode_parts(bytes(64 * KiB), compress=True)
    for bad, length, match in [
        (header, len(data) + 1, "holds 3000 bytes, not 3001"),
        (compressed, 64 * KiB, "lz4"),
        (CHUNK_HEADER.pack(0x80, len(data), 0), len(data), "unknown flags"),
        (header[:-1], len(data), "header is 16 bytes"),
    ]:
        with pytest.raises(CorruptChunkError, match=match):
            raw_header_checksum(bad, length)


# --- corruption on the way -------------------------------------------------------------


def test_corrupted_chunks_are_fetched_again(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    src = make_tree(tmp_path / "src")
    fetches: collections.Counter[ChunkSpec] = collections.Counter()

    def corrupt_first_time(fetch: Fetch) -> Fetch:
        async def damaging(spec: ChunkSpec) -> bytes:
            fetches[spec] += 1
            frame = await fetch(spec)
            return flip_payload_byte(frame) if fetches[spec] == 1 else frame
        return damaging

    with caplog.at_level(logging.WARNING, logger="dckpt._transfer"):
        manifest = copy(src, tmp_path / "dst", chunk_bytes=MiB, wrap=corrupt_first_time)
    assert snapshot(tmp_path / "dst") == snapshot(src)
    specs = manifest.chunks(MiB)
    assert fetches == {spec: 2 for spec in specs}
    warnings = [r for r in caplog.records if "fetching it again" in r.getMessage()]
    assert len(warnings) == len(specs)


def test_a_chunk_corrupted_every_time_fails_and_leaves_nothing(tmp_path: Path):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    fetches: collections.Counter[ChunkSpec] = collections.Counter()
    weights = [f.path for f in build_manifest(src).files].index("model/weights.bin")
    bad = ChunkSpec(weights, MiB, MiB)

    def always_corrupt_one(fetch: Fetch) -> Fetch:
        async def damaging(spec: ChunkSpec) -> bytes:
            fetches[spec] += 1
            frame = await fetch(spec)
            return flip_payload_byte(frame) if spec == bad else frame
        return damaging

    with pytest.raises(CorruptChunkError, match=r"weights.bin.*still corrupt after 3 fetches"):
        copy(src, out / "dst", chunk_bytes=MiB, wrap=always_corrupt_one, retries=2)
    assert os.listdir(out) == []
    assert fetches[bad] == 3


@pytest.mark.parametrize("limit", [1, 3])
def test_frames_held_at_once_stay_within_max_in_flight_and_one(tmp_path: Path, limit: int):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(random.Random(5).randbytes(40 * KiB))
    manifest = build_manifest(src)
    yielded = 0
    callback = RecordingCallback()
    held: list[int] = []  # frames the receiver holds, counting the one about to come

    async def eager(specs: Sequence[ChunkSpec]) -> AsyncIterator[tuple[ChunkSpec, bytes]]:
        # Never waits: only the receiver's own back-pressure limits what it takes.
        nonlocal yielded
        with ChunkSource(str(src), manifest, KiB) as source:
            for spec in specs:
                held.append(yielded - len(callback.updates) + 1)
                yielded += 1
                yield spec, source.read_chunk(spec)

    asyncio.run(receive_directory(manifest, eager, tmp_path / "dst", chunk_bytes=KiB,
                                  max_in_flight=limit, callback=callback))
    # ``limit`` being written and one more received meanwhile (receiving overlaps writing).
    assert max(held) == limit + 1
    assert yielded == len(callback.updates) == 40
    assert (tmp_path / "dst" / "data").read_bytes() == (src / "data").read_bytes()


@pytest.mark.parametrize("value, name", [(0, "max_in_flight"), (-1, "retries")])
def test_bad_limits_are_refused(tmp_path: Path, value: int, name: str):
    (tmp_path / "src").mkdir()
    manifest = build_manifest(tmp_path / "src")
    with pytest.raises(ValueError, match=f"{name} must be an integer of at least"):
        asyncio.run(receive_directory(manifest, stream_of(inline_fetch(None)), tmp_path / "dst",
                                      chunk_bytes=KiB, **{name: value}))  # type: ignore[arg-type]
    assert not (tmp_path / "dst").exists()


def test_a_stream_that_sends_the_wrong_chunks_is_refused(tmp_path: Path):
    src = make_tree(tmp_path / "src")
    manifest = build_manifest(src)
    out = tmp_path / "out"

    def receive(stream: ChunkStream) -> None:
        asyncio.run(receive_directory(manifest, stream, out / "dst", chunk_bytes=MiB))

    with ChunkSource(str(src), manifest, MiB) as source:
        async def twice(specs: Sequence[ChunkSpec]) -> AsyncIterator[tuple[ChunkSpec, bytes]]:
            for spec in [specs[0], *specs]:
                yield spec, source.read_chunk(spec)

        async def short(specs: Sequence[ChunkSpec]) -> AsyncIterator[tuple[ChunkSpec, bytes]]:
            for spec in specs[:-1]:
                yield spec, source.read_chunk(spec)

        with pytest.raises(CorruptChunkError, match="not asked for or came twice"):
            receive(twice)
        with pytest.raises(CorruptChunkError, match=r"ended without 1 of the \d+ chunks"):
            receive(short)
    assert os.listdir(out) == []


def test_read_parts_hands_over_its_buffer_uncopied(tmp_path: Path):
    data = random.Random(9).randbytes(3 * KiB)
    (tmp_path / "data").write_bytes(data)
    spec = ChunkSpec(0, KiB, KiB)
    with ChunkSource(str(tmp_path), build_manifest(tmp_path), KiB) as source:
        header, payload = source.read_parts(spec)
    assert isinstance(payload, memoryview) and payload.obj is not None
    assert bytes(payload) == data[KiB : 2 * KiB]
    assert b"".join((header, payload)) == encode_chunk(data[KiB : 2 * KiB], compress=False)
    assert bytes(decode_chunk((header, payload), spec)) == data[KiB : 2 * KiB]


def test_a_failing_fetch_cancels_the_rest_and_leaves_nothing(tmp_path: Path):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    started: list[ChunkSpec] = []

    def failing(fetch: Fetch) -> Fetch:
        async def wrapped(spec: ChunkSpec) -> bytes:
            started.append(spec)
            if len(started) == 3:
                raise ConnectionError("the sender went away")
            await asyncio.sleep(0.001)
            return await fetch(spec)
        return wrapped

    with pytest.raises(ConnectionError, match="went away"):
        copy(src, out / "dst", chunk_bytes=64 * KiB, wrap=failing)
    assert os.listdir(out) == []
    assert len(started) < len(build_manifest(src).chunks(64 * KiB))


def test_cancelling_a_transfer_leaves_nothing(tmp_path: Path):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    manifest = build_manifest(src)

    async def main() -> int:
        fetched = 0
        blocked = asyncio.Event()
        with ChunkSource(str(src), manifest, 64 * KiB) as source:
            async def fetch(spec: ChunkSpec) -> bytes:
                nonlocal fetched
                fetched += 1
                if fetched > 5:
                    blocked.set()
                    await asyncio.sleep(3600)
                return source.read_chunk(spec)

            task = asyncio.ensure_future(
                receive_directory(manifest, stream_of(fetch), out / "dst", chunk_bytes=64 * KiB)
            )
            await blocked.wait()
            assert [name for name in os.listdir(out) if name.endswith(".partial")]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return fetched

    assert asyncio.run(main()) < len(manifest.chunks(64 * KiB))
    assert os.listdir(out) == []


# --- the manifest ----------------------------------------------------------------------


def test_manifest_round_trips_through_msgpack(tmp_path: Path):
    manifest = build_manifest(make_tree(tmp_path / "src"))
    wire = msgpack.unpackb(msgpack.packb(manifest.to_dict()))
    assert Manifest.from_dict(wire) == manifest
    assert {f.path for f in manifest.files} >= {"empty_file", "model/weights.bin", "run.sh"}
    assert {"empty_dir", "model", "model/layers", "model/layers/deep"} <= set(manifest.directories)
    assert manifest.symlinks == (("model/latest", "weights.bin"),)
    assert [f.mode for f in manifest.files if f.path == "run.sh"] == [0o755]


def test_the_digest_is_of_the_content_wherever_it_is(tmp_path: Path):
    src = make_tree(tmp_path / "src")
    first = build_manifest(src)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(src, copy, symlinks=True)  # new inodes, new mtimes, same bytes
    os.utime(copy / "run.sh", ns=(1, 1))
    assert build_manifest(copy).digest == first.digest
    assert len(first.content_id) == 32 and first.digest.startswith(first.content_id)
    weights = copy / "model" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, same size
    weights.write_bytes(bytes(data))
    assert build_manifest(copy).digest != first.digest
    os.chmod(src / "run.sh", 0o700)
    assert build_manifest(src).digest != first.digest
    second = build_manifest(src)
    (src / "empty_dir" / "sub").mkdir()
    assert build_manifest(src).digest != second.digest


def test_a_file_is_hashed_once_per_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from dckpt._transfer import _hashes

    src = make_tree(tmp_path / "src")
    # Seen a minute later: every file has settled (see the next test).
    monkeypatch.setattr(_hashes, "_now_ns", lambda: time.time_ns() + 60 * 10**9)
    build_manifest(src)
    read: list[str] = []
    real = _hashes.hash_file_and_chunks
    monkeypatch.setattr(_hashes, "hash_file_and_chunks",
                        lambda path, chunk_bytes: read.append(path) or real(path, chunk_bytes))
    again = build_manifest(src)
    assert read == []  # nothing read again
    with open(src / "run.sh", "ab") as f:
        f.write(b"#")
    changed = build_manifest(src)
    assert [os.path.basename(p) for p in read] == ["run.sh"]
    assert changed.digest != again.digest


def test_a_file_just_written_is_hashed_again_next_time(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    """Its key (inode, size, ctime) may yet be another file's: remembered once settled."""
    from dckpt._transfer import _hashes

    src = make_tree(tmp_path / "src")
    # Seen 1 ms after the first write, however long the others took: none has settled.
    oldest = min(os.stat(p).st_ctime_ns for p in src.rglob("*") if p.is_file())
    monkeypatch.setattr(_hashes, "_now_ns", lambda: oldest + 10**6)
    files = len(build_manifest(src).files)
    read: list[str] = []
    real = _hashes.hash_file_and_chunks
    monkeypatch.setattr(_hashes, "hash_file_and_chunks",
                        lambda path, chunk_bytes: read.append(path) or real(path, chunk_bytes))
    build_manifest(src)
    assert len(read) == files  # read again
    assert _hashes._settled(10**9 + 1, 10**9 + 1 + _hashes.SETTLE_NS)
    assert not _hashes._settled(10**9 + 1, 10**9 + _hashes.SETTLE_NS)
    # A filesystem that keeps whole seconds: two of them.
    assert not _hashes._settled(10**9, 10**9 + 10**9)
    assert _hashes._settled(10**9, 10**9 + 2 * 10**9)


class _CoarseCtimeOs:
    """``os`` as :mod:`dckpt._transfer._hashes` sees it on a kernel that stamps ctime
    from a clock of 10 ms ticks (before Linux 6.13's fine-grained timestamps)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def stat(path: str) -> types.SimpleNamespace:
        st = os.stat(path)
        return types.SimpleNamespace(st_dev=st.st_dev, st_ino=st.st_ino, st_size=st.st_size,
                                     st_mode=st.st_mode,
                                     st_ctime_ns=st.st_ctime_ns // 10**7 * 10**7)


def test_a_file_in_place_of_a_deleted_one_is_not_taken_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Deleted and written again at once, a file of the same size gets the old one's
    inode (ext4 reuses it) and, within one tick of a coarse clock, its ctime: the old
    key. Its hash must be read, not remembered from the deleted file."""
    from dckpt._transfer import _hashes

    monkeypatch.setattr(_hashes, "os", _CoarseCtimeOs())
    path = tmp_path / "weights.bin"
    for i in range(50):
        path.write_bytes(bytes([i % 251]) * 4096)
        assert file_hash(str(path)) == hash_file(str(path))
        path.unlink()
        path.write_bytes(bytes([(i + 1) % 251]) * 4096)
        assert file_hash(str(path)) == hash_file(str(path)), f"a stale hash, round {i}"
        path.unlink()


def test_build_manifest_excludes_and_refuses_non_directories(tmp_path: Path):
    src = make_tree(tmp_path / "src")
    manifest = build_manifest(src, exclude=lambda rel: rel.startswith("model"))
    assert {f.path for f in manifest.files} == {"empty_file", "run.sh"}
    with pytest.raises(NotADirectoryError, match="not a directory"):
        build_manifest(src / "run.sh")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_manifest(tmp_path / "nowhere")


H = "0" * 32  # a file hash


def _good() -> dict[str, Any]:
    files = (FileEntry("a/b.bin", 10, 0o644, H),)
    return {
        "format_version": 3,
        "files": [["a/b.bin", 10, 0o644, H]],
        "directories": ["a"],
        "symlinks": [["a/link", "b.bin"]],
        "digest": content_digest(files, ("a",), (("a/link", "b.bin"),)),
    }


def _with(**changes: Any) -> dict[str, Any]:
    return {**_good(), **changes}


@pytest.mark.parametrize(
    "manifest, error, match",
    [
        (_with(files=[["../x", 1, 0o644, H]]), UnsafePathError, "'..'"),
        (_with(files=[["/etc/passwd", 1, 0o644, H]]), UnsafePathError, "absolute"),
        (_with(directories=["a/../../up"]), UnsafePathError, "'..'"),
        (_with(symlinks=[["a/link", "../../etc"]]), UnsafePathError, "leads outside"),
        (_with(symlinks=[["a/link", "/etc"]]), UnsafePathError, "leads outside"),
        (_with(symlinks=[["p", "."], ["p/q", ".."]]), UnsafePathError, "below the symlink"),
        (_with(files=[["a/link/x", 1, 0o644, H]]), UnsafePathError, "symlink .a/link.*below it"),
        (_with(files=[["a/b.bin", -1, 0o644, H]]), CheckpointFormatError, "size -1"),
        (_with(files=[["a/b.bin", "10", 0o644, H]]), CheckpointFormatError, "size '10'"),
        (_with(files=[["a/b.bin", 1.5, 0o644, H]]), CheckpointFormatError, "size 1.5"),
        (_with(files=[["a/b.bin", True, 0o644, H]]), CheckpointFormatError, "size True"),
        (_with(files=[["a/b.bin", 1, -1, H]]), CheckpointFormatError, "mode -1"),
        (_with(files=[["a/b.bin", 1, 0o10000, H]]), CheckpointFormatError, "mode 4096"),
        (_with(files=[["a/b.bin", 1]]), CheckpointFormatError, "not a list of 4"),
        (_with(files="a/b.bin"), CheckpointFormatError, "files is a str"),
        (_with(files=[["a/b.bin", 1, 0o644, H], ["a/b.bin", 1, 0o644, H]]),
         CheckpointFormatError, "duplicate"),
        (_with(files=[["a/b.bin", 1, 0o644, H], ["a/b.bin/c", 1, 0o644, H]]),
         CheckpointFormatError, "below the file"),
        (_with(files=[[7, 1, 0o644, H]]), UnsafePathError, "not a plain relative path"),
        (_with(symlinks=[["a/link", 5]]), CheckpointFormatError, "target 5"),
        (_with(digest="abc"), CheckpointFormatError, "digest 'abc'"),
        (_with(digest="0" * 64), CheckpointFormatError, "not the digest of its entries"),
        (_with(files=[["a/b.bin", 10, 0o644, "1" * 32]]), CheckpointFormatError,
         "not the digest of its entries"),
        (_with(files=[["a/b.bin", 10, 0o644, "xyz"]]), CheckpointFormatError,
         "file hash 'xyz' is not 32 hex digits"),
        (_with(format_version=2), CheckpointFormatError, "format_version 2 is not 3"),
        ({k: v for k, v in _good().items() if k != "digest"}, CheckpointFormatError,
         "expected the keys"),
        (_with(extra=1), CheckpointFormatError, "expected the keys"),
        ([1, 2], CheckpointFormatError, "expected a mapping"),
    ],
)
def test_hostile_manifests_are_refused(manifest: Any, error: type[Exception], match: str):
    with pytest.raises(error, match=match):
        Manifest.from_dict(manifest)


def test_the_good_manifest_of_the_hostile_test_is_accepted():
    manifest = Manifest.from_dict(_good())
    assert manifest.files == (FileEntry("a/b.bin", 10, 0o644, H),)
    assert manifest.total_bytes == 10


def test_receive_checks_a_manifest_built_by_hand(tmp_path: Path):
    manifest = Manifest((FileEntry("../escape", 1, 0o644, "0" * 32),), (), (), "0" * 64)

    async def fetch(spec: ChunkSpec) -> bytes:
        raise AssertionError("nothing may be fetched for an unsafe manifest")

    with pytest.raises(UnsafePathError, match="'..'"):
        asyncio.run(receive_directory(manifest, stream_of(fetch), tmp_path / "out" / "dst", chunk_bytes=KiB))
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


# --- the sender ------------------------------------------------------------------------


def test_a_file_truncated_after_the_manifest_is_refused(tmp_path: Path):
    src = make_tree(tmp_path / "src")
    manifest = build_manifest(src)
    index = [f.path for f in manifest.files].index("model/weights.bin")
    with ChunkSource(str(src), manifest, MiB) as source:
        source.read_chunk(ChunkSpec(index, 0, MiB))  # opens it while it is whole
        os.truncate(src / "model" / "weights.bin", 2 * MiB + 10)
        with pytest.raises(CheckpointFormatError, match=r"weights.bin.*ends at byte 2097162"):
            source.read_chunk(ChunkSpec(index, 2 * MiB, MiB))
    # Opened only after the change: refused by its size, and the receiver cleans up.
    out = tmp_path / "out"
    with ChunkSource(str(src), manifest, MiB) as source, pytest.raises(
        CheckpointFormatError, match=r"has 2097162 bytes, not 5242880.*register it again"
    ):
        asyncio.run(receive_directory(manifest, stream_of(inline_fetch(source)), out / "dst", chunk_bytes=MiB))
    assert os.listdir(out) == []


def test_a_file_rewritten_after_the_manifest_is_caught_by_its_hash(tmp_path: Path):
    """Same size, other bytes: every chunk checks out, the file's hash does not."""
    src = make_tree(tmp_path / "src")
    manifest = build_manifest(src)
    weights = src / "model" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[7] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    with ChunkSource(str(src), manifest, MiB) as source, pytest.raises(
        CorruptChunkError, match=r"'model/weights.bin': its bytes hash to [0-9a-f]{32}, not to"
    ):
        asyncio.run(receive_directory(manifest, stream_of(inline_fetch(source)), out / "dst",
                                      chunk_bytes=MiB))
    assert os.listdir(out) == []


def _reading_back(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the receiver reads back to hash them, as it reads them."""
    from dckpt._transfer import _receive

    read: list[str] = []
    real = _receive.hash_file
    monkeypatch.setattr(_receive, "hash_file", lambda path: read.append(path) or real(path))
    return read


@pytest.mark.parametrize("in_flight", [1, 3])
def test_files_are_hashed_as_their_chunks_arrive_not_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_flight: int
):
    """In order (as a comm answers), no file is read again after it is written: its
    hash comes from its chunks, also with several chunks of one file written at once."""
    src = make_tree(tmp_path / "src")
    read = _reading_back(monkeypatch)
    manifest = copy(src, tmp_path / "dst", chunk_bytes=256 * KiB, fetcher=threaded_fetch,
                    max_in_flight=in_flight)
    assert snapshot(tmp_path / "dst") == snapshot(src)
    assert read == []
    assert build_manifest(tmp_path / "dst").digest == manifest.digest


def test_a_received_file_is_last_changed_by_its_last_write(tmp_path: Path):
    """A file its owner may write gets its mode before its chunks, not by a ``chmod``
    after its hash was checked, which would leave every file racily fresh (and read
    back by the next manifest of the copy); a read-only one gets its mode at the end."""
    src = make_tree(tmp_path / "src")
    (src / "frozen.bin").write_bytes(random.Random(1).randbytes(300 * KiB))
    (src / "frozen.bin").chmod(0o444)
    dst = tmp_path / "dst"
    copy(src, dst, chunk_bytes=64 * KiB)
    assert snapshot(dst) == snapshot(src)
    writable = [p for p in dst.rglob("*") if p.is_file() and not p.is_symlink()
                and p.stat().st_size and p.stat().st_mode & stat.S_IWUSR]
    assert len(writable) == 4
    for path in writable:
        st = path.stat()
        assert st.st_ctime_ns == st.st_mtime_ns, path  # no change after the last write


def test_chunks_are_written_in_pieces_of_a_mebibyte_at_most(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    """Larger writes get page-cache folios of 2 MiB, slow to fault in on a VM that hands
    free memory back (see WRITE_PIECE_BYTES)."""
    from dckpt._transfer._chunk_writer import WRITE_PIECE_BYTES

    src = make_tree(tmp_path / "src")
    writes: list[int] = []
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: writes.append(len(data))
                        or real(fd, data, offset))
    copy(src, tmp_path / "dst", chunk_bytes=8 * MiB)
    assert snapshot(tmp_path / "dst") == snapshot(src)
    assert WRITE_PIECE_BYTES <= MiB and max(writes) == WRITE_PIECE_BYTES
    assert sum(writes) == sum(f.size for f in build_manifest(src).files)


def test_chunks_out_of_order_still_check_each_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    """Answers in another order (a chunk fetched again comes last): the file is read back
    to be hashed, and a file whose bytes are not its manifest's is still refused."""
    src = make_tree(tmp_path / "src")
    read = _reading_back(monkeypatch)
    manifest = build_manifest(src)

    def shuffled(source: ChunkSource) -> ChunkStream:
        async def stream(specs: Sequence[ChunkSpec]) -> AsyncIterator[tuple[ChunkSpec, bytes]]:
            for spec in sorted(specs, key=lambda s: (s.file_index, -s.offset)):
                yield spec, source.read_chunk(spec)
        return stream

    with ChunkSource(str(src), manifest, MiB) as source:
        asyncio.run(receive_directory(manifest, shuffled(source), tmp_path / "dst",
                                      chunk_bytes=MiB))
    assert snapshot(tmp_path / "dst") == snapshot(src)
    assert sorted(os.path.basename(p) for p in read) == ["text.log", "weights.bin"]

    weights = src / "model" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[3 * MiB + 1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with ChunkSource(str(src), manifest, MiB) as source, pytest.raises(
        CorruptChunkError, match=r"'model/weights.bin': its bytes hash to [0-9a-f]{32}, not to"
    ):
        asyncio.run(receive_directory(manifest, shuffled(source), tmp_path / "out" / "dst",
                                      chunk_bytes=MiB))
    assert os.listdir(tmp_path / "out") == []


def test_a_file_removed_after_the_manifest_is_refused(tmp_path: Path):
    src = make_tree(tmp_path / "src")
    manifest = build_manifest(src)
    os.remove(src / "run.sh")
    index = [f.path for f in manifest.files].index("run.sh")
    with ChunkSource(str(src), manifest, MiB) as source:
        with pytest.raises(CheckpointFormatError, match="run.sh' is gone"):
            source.read_chunk(ChunkSpec(index, 0, 5))


@pytest.mark.parametrize(
    "spec, match",
    [
        (ChunkSpec(99, 0, 1), "no file #99"),
        (ChunkSpec(-1, 0, 1), "no file #-1"),
        (ChunkSpec(0, 0, 2 * KiB), "chunks of at most 1024"),
        (ChunkSpec(0, 10, 1), "no chunk of 1 bytes at offset 10"),
        (ChunkSpec(0, -1, 1), "at offset -1"),
        (ChunkSpec(0, 0, 0), "no chunk of 0 bytes"),
    ],
)
def test_source_refuses_chunks_it_does_not_have(tmp_path: Path, spec: ChunkSpec, match: str):
    (tmp_path / "ten").write_bytes(b"0123456789")
    with ChunkSource(str(tmp_path), build_manifest(tmp_path), KiB) as source:
        assert bytes(decode_chunk(source.read_chunk(ChunkSpec(0, 2, 3)), ChunkSpec(0, 2, 3))) == b"234"
        with pytest.raises(ValueError, match=match):
            source.read_chunk(spec)
    with pytest.raises(ValueError, match="closed"):
        source.read_chunk(ChunkSpec(0, 0, 1))


def test_a_file_hashed_for_its_manifest_knows_its_chunk_checksums(tmp_path: Path):
    """One read gives the file's hash and each chunk's checksum, the last chunk short."""
    from dckpt._transfer._hashes import hash_file_and_chunks

    data = random.Random(2).randbytes(5 * MiB + 17)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    digest, checksums = hash_file_and_chunks(str(path), 2 * MiB)
    assert digest == hash_file(str(path))
    assert checksums == tuple(xxhash.xxh3_64_intdigest(data[i : i + 2 * MiB])
                              for i in range(0, len(data), 2 * MiB))
    (tmp_path / "empty").write_bytes(b"")
    assert hash_file_and_chunks(str(tmp_path / "empty"), MiB)[1] == ()


def test_a_source_sends_from_the_file_with_the_checksums_remembered_with_its_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """read_region reads nothing for a chunk's checksum once the manifest's hashing
    computed it (at this chunk size, for this version of the file); otherwise it reads
    the chunk, and the header is right either way."""
    from dckpt._transfer import _hashes

    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(3).randbytes(3 * MiB + 5)
    (src / "weights.bin").write_bytes(data)
    monkeypatch.setattr(_hashes, "_now_ns", lambda: time.time_ns() + 60 * 10**9)  # settled
    read: list[ChunkSpec] = []
    real = ChunkSource._checksum
    monkeypatch.setattr(ChunkSource, "_checksum",
                        lambda self, fd, spec, entry: read.append(spec) or real(self, fd, spec,
                                                                                entry))

    def headers(chunk_bytes: int) -> list[bytes]:
        with dask.config.set({"dckpt.transfer.chunk-bytes": MiB}), \
                ChunkSource(str(src), build_manifest(src), chunk_bytes) as source:
            out = []
            for spec in source.manifest.chunks(chunk_bytes):
                header, region = source.read_region(spec)
                region.close()
                out.append(header)
            return out

    def expected(chunk_bytes: int) -> list[bytes]:
        return [encode_parts(data[i : i + chunk_bytes], compress=False)[0]
                for i in range(0, len(data), chunk_bytes)]

    assert headers(MiB) == expected(MiB)
    assert read == []  # all four from the memo
    assert headers(512 * KiB) == expected(512 * KiB)  # another chunk size: read
    assert len(read) == 7
    read.clear()
    changed = bytearray(data)
    changed[-1] ^= 1
    (src / "weights.bin").write_bytes(changed)  # same size, new version
    data = bytes(changed)
    assert headers(MiB) == expected(MiB)
    assert read == []  # hashed anew for the new manifest, checksums with it


def test_a_received_copy_is_served_on_with_the_checksums_it_was_checked_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A relay, or any holder of a fetched copy, reads nothing for the checksums of the
    chunks it sends from its files: the receiver remembered them with the hashes."""
    from dckpt._transfer import _hashes

    src = make_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    monkeypatch.setattr(_hashes, "_now_ns", lambda: time.time_ns() + 60 * 10**9)  # settled
    copy(src, dst, chunk_bytes=MiB, fetcher=threaded_fetch)
    read: list[ChunkSpec] = []
    real = ChunkSource._checksum
    monkeypatch.setattr(ChunkSource, "_checksum",
                        lambda self, fd, spec, entry: read.append(spec) or real(self, fd, spec,
                                                                                entry))
    manifest = build_manifest(dst)
    served = 0
    with ChunkSource(str(dst), manifest, MiB) as source:
        for spec in manifest.chunks(MiB):
            header, region = source.read_region(spec)
            with region:
                data = os.pread(region.fd, region.length, region.offset)
            assert header == encode_parts(data, compress=False)[0]
            served += 1
    assert served == 10 and read == []


def test_source_keeps_few_files_open(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(200):
        (src / f"f{i:03}").write_bytes(b"x" * (i + 1))
    manifest = build_manifest(src)
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with ChunkSource(str(src), manifest, KiB) as source:
        copy_dst = tmp_path / "dst"
        asyncio.run(receive_directory(manifest, stream_of(threaded_fetch(source)), copy_dst, chunk_bytes=KiB))
        if before is not None:
            assert len(os.listdir("/proc/self/fd")) - before <= 64
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before
    assert snapshot(copy_dst) == snapshot(src)


# --- memory ----------------------------------------------------------------------------


def test_memory_stays_at_a_few_chunks(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(6)
    digest = hashlib.sha256()
    with open(src / "big.bin", "wb") as f:
        for _ in range(64):
            piece = rng.randbytes(MiB)
            digest.update(piece)
            f.write(piece)
    manifest = build_manifest(src)
    tracemalloc.start()
    try:
        with ChunkSource(str(src), manifest, MiB) as source:
            asyncio.run(receive_directory(
                manifest, stream_of(inline_fetch(source)), tmp_path / "dst", chunk_bytes=MiB,
                max_in_flight=4,
            ))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Chunks alive at once, at most: 4 being written (max_in_flight) and 1 taken
    # meanwhile, 2 for the chunk this test's inline fetch is reading (its buffer and its
    # bytes), 1 whose write just ended and whose task has not let go of it yet; plus a
    # chunk's worth for everything else. Runs measured 6.06-8.06 MiB; 64 MiB cross.
    assert peak < (4 + 1 + 2 + 1 + 1) * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    check = hashlib.sha256()
    with open(tmp_path / "dst" / "big.bin", "rb") as f:
        while piece := f.read(4 * MiB):
            check.update(piece)
    assert check.digest() == digest.digest()


# --- progress ---------------------------------------------------------------------------


def test_a_large_receive_logs_its_progress_and_is_listed_while_it_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    src = make_tree(tmp_path / "src")
    manifest = build_manifest(src)
    seen: list[list[ReceiveProgress]] = []

    def watch(fetch: Fetch) -> Fetch:
        async def watched(spec: ChunkSpec) -> bytes:
            seen.append(receiving())
            return await fetch(spec)
        return watched

    with dask.config.set({"dckpt.transfer.log-progress-bytes": "1MiB"}), \
            caplog.at_level(logging.INFO, logger="dckpt"):
        copy(src, tmp_path / "dst", chunk_bytes=256 * KiB, wrap=watch, source="node-0's store")

    assert receiving() == []  # gone from the table once done
    first, last = seen[0], seen[-1]
    assert [(p.checkpoint_id, p.source, p.total, p.done) for p in first] == [
        (manifest.content_id, "node-0's store", manifest.total_bytes, 0)]
    assert 0 < last[0].done < manifest.total_bytes
    lines = [r.getMessage() for r in caplog.records if r.name == "dckpt._transfer._progress"]
    assert len(lines) == 10, lines  # one per tenth: no chunk of 256 KiB spans two tenths
    assert lines[-1].startswith(f"receiving checkpoint {manifest.content_id} from "
                                "node-0's store: 100% (")
    assert all(r.levelno == logging.INFO for r in caplog.records
               if r.name == "dckpt._transfer._progress")


def test_a_small_receive_logs_no_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    src = make_tree(tmp_path / "src")
    with caplog.at_level(logging.INFO, logger="dckpt"):  # the default: 64 MiB and up
        copy(src, tmp_path / "dst", chunk_bytes=1 * MiB)
    assert not [r for r in caplog.records if r.name == "dckpt._transfer._progress"]
