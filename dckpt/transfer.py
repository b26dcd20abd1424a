"""Copy a directory from one node to another as a manifest followed by chunks.

Everything of a node-to-node transfer except Dask, so that it can be tested with plain
function calls. The receiver asks the sender for a :class:`Manifest` (what files,
folders and symlinks the directory holds), cuts the files into :class:`ChunkSpec`\\ s
and asks for several chunks at once; the sender answers each with one encoded frame::

    header  CHUNK_HEADER (13 bytes, big-endian): flags: uint8 (bit 0: lz4-compressed),
            raw length: uint64, crc32 of the raw bytes: uint32
    payload the raw bytes, or one lz4 block (no size prefix) that decompresses to them

Which side runs what:

- sender (``NodeStore.read_chunk``, in a thread of distributed's actor pool):
  :class:`ChunkSource`, thread-safe, reading with ``os.preadv`` into reused buffers;
- receiver (``NodeStore.fetch``, on the worker's event loop): :func:`receive_directory`,
  a coroutine that keeps ``max-in-flight`` fetches going and hands the CPU and disk
  work of each chunk (decode, crc32, ``os.pwrite``) to a thread.

Compression is decided per chunk: lz4 costs ~1.4 s per GiB and gains nothing on model
weights, so only chunks whose 64 KiB sample shrinks are compressed. The crc32 covers
the raw bytes, so it checks decompression too. Memory on either side grows by a few
chunks (about ``max-in-flight``), never by the size of the checkpoint.

Settings (read where used): ``dckpt.transfer.chunk-bytes``,
``dckpt.transfer.max-in-flight``, ``dckpt.transfer.compression``,
``dckpt.transfer.retries``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import dask.config
import lz4.block
from dask.utils import parse_bytes
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt.errors import CheckpointFormatError, CorruptChunkError
from dckpt.formats._atomic import atomic_directory
from dckpt.formats._paths import EntryIndex, safe_relpath
from dckpt.formats._tree import plan_tree

__all__ = [
    "CHUNK_HEADER",
    "ChunkSource",
    "ChunkSpec",
    "FileEntry",
    "Manifest",
    "build_manifest",
    "decode_chunk",
    "encode_chunk",
    "receive_directory",
]

logger = logging.getLogger(__name__)

CHUNK_HEADER = struct.Struct(">BQI")
"""Header of every chunk frame: flags, raw length, crc32 of the raw bytes."""

MANIFEST_VERSION = 1

_FLAG_LZ4 = 0x01
_KNOWN_FLAGS = _FLAG_LZ4
# The compression decision looks at this much of a chunk: lz4 compresses 64 KiB in
# ~20 µs here, against ~5 ms for a whole 8 MiB chunk of incompressible data.
_SAMPLE_BYTES = 64 * 1024
# Compress a chunk only if its sample shrinks below this fraction: lz4 costs ~1.4 s per
# GiB to compress and ~0.7 s to decompress here, so a smaller saving does not pay on a
# ~1.6 GB/s link. tests/test_transfer.py::test_half_compressible_chunk_goes_by_its_sample
# pins where the sample is taken.
_MIN_RATIO = 0.9
# lz4 blocks hold at most LZ4_MAX_INPUT_SIZE (~2 GiB); chunks are far smaller anyway.
_MAX_CHUNK_BYTES = 1 << 30
# A sender keeps at most this many files open at once; a checkpoint of thousands of
# small files must not exhaust a worker's descriptors (often 1024, sockets included).
_MAX_OPEN_FILES = 64
_MAX_FILE_BYTES = (1 << 63) - 1  # off_t
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIGEST = re.compile(r"[0-9a-f]{64}")

Compression = Literal["auto", "lz4", "none"]


# --- the manifest ----------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """A regular file of a manifest: relative POSIX path, size in bytes, permission bits."""

    path: str
    size: int
    mode: int


@dataclass(frozen=True)
class ChunkSpec:
    """``length`` bytes at ``offset`` of the manifest's file number ``file_index``."""

    file_index: int
    offset: int
    length: int


@dataclass(frozen=True)
class Manifest:
    """What a directory holds, in the order it is sent.

    Attributes
    ----------
    files
        Regular files (symlinks that lead outside the tree are dereferenced, as
        ``shutil.copytree`` does). ``ChunkSpec.file_index`` indexes this tuple.
    directories
        Every directory, so that empty ones survive the copy. Their modes are not
        kept: the receiver creates them with the default mode.
    symlinks
        ``(path, target)`` of symlinks whose relative target stays inside the tree;
        they are recreated as links.
    digest
        An identity of the content, see :func:`build_manifest`.
    """

    files: tuple[FileEntry, ...]
    directories: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]
    digest: str

    @property
    def total_bytes(self) -> int:
        """The sum of the file sizes."""
        return sum(entry.size for entry in self.files)

    def chunks(self, chunk_bytes: int) -> list[ChunkSpec]:
        """Every file cut into pieces of ``chunk_bytes`` (the last one shorter).

        Files in manifest order, each from its start; empty files get no chunk.
        """
        chunk_bytes = _check_chunk_bytes(chunk_bytes)
        return [
            ChunkSpec(index, offset, min(chunk_bytes, entry.size - offset))
            for index, entry in enumerate(self.files)
            for offset in range(0, entry.size, chunk_bytes)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, ints and strings, for msgpack (Dask's comms) or JSON."""
        return {
            "format_version": MANIFEST_VERSION,
            "files": [[entry.path, entry.size, entry.mode] for entry in self.files],
            "directories": list(self.directories),
            "symlinks": [[path, target] for path, target in self.symlinks],
            "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """The manifest that :meth:`to_dict` returned, checked as coming from outside.

        Raises
        ------
        UnsafePathError
            An entry would land outside the target directory: ``..``, an absolute
            path, a symlink leading out, an entry below a symlink.
        CheckpointFormatError
            Anything else malformed: unknown or missing keys, wrong types, negative
            sizes, modes beyond ``0o7777``, duplicate entries, entries below a file.
        """
        if not isinstance(d, Mapping):
            raise _malformed(f"expected a mapping, got {type(d).__name__}")
        expected = {"format_version", "files", "directories", "symlinks", "digest"}
        if set(d) != expected:
            raise _malformed(
                f"expected the keys {sorted(expected)}, got {sorted(map(str, d))}"
            )
        if d["format_version"] != MANIFEST_VERSION or isinstance(d["format_version"], bool):
            raise _malformed(
                f"format_version {d['format_version']!r} is not {MANIFEST_VERSION}; "
                "sender and receiver run different dckpt versions"
            )
        digest = d["digest"]
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise _malformed(f"digest {digest!r} is not a hex sha256")
        files = tuple(
            FileEntry(safe_relpath(path), _int(size, "size", _MAX_FILE_BYTES),
                      _int(mode, "mode", 0o7777))
            for path, size, mode in _rows(d["files"], "files", 3)
        )
        directories = tuple(safe_relpath(path) for path in _items(d["directories"], "directories"))
        symlinks = tuple(
            (safe_relpath(path), _str(target, "symlink target"))
            for path, target in _rows(d["symlinks"], "symlinks", 2)
        )
        index = EntryIndex()
        for name in directories:
            index.add(name, "directory")
        for entry in files:
            index.add(entry.path, "file")
        for name, target in symlinks:
            index.add(name, "symlink", target)
        return cls(files, directories, symlinks, digest)


def _malformed(problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"malformed transfer manifest: {problem}; it must come from Manifest.to_dict()"
    )


def _items(value: object, what: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _malformed(f"{what} is a {type(value).__name__}, not a list")
    return list(value)


def _rows(value: object, what: str, width: int) -> list[Any]:
    rows = _items(value, what)
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != width:
            raise _malformed(f"{what} holds {row!r}, not a list of {width} items")
    return rows


def _int(value: object, what: str, maximum: int) -> int:
    # bool is an int subclass; True is no size.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise _malformed(f"{what} {value!r} is not an integer in [0, {maximum}]")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _malformed(f"{what} {value!r} is not a string")
    return value


def build_manifest(
    root: str | os.PathLike[str], *, exclude: Callable[[str], bool] | None = None
) -> Manifest:
    """The manifest of the directory ``root``, from ``stat`` calls alone.

    The walk is that of the packed format (:func:`~dckpt.formats._tree.plan_tree`):
    sorted, in-tree relative symlinks kept as links, others dereferenced, special files
    and directory cycles skipped with a warning.

    The digest is the hex sha256 of the sorted ``(path, size, mtime_ns, mode)`` of the
    files, the directories and the symlinks with their targets. It is **not** a hash of
    the bytes, which would cost a full read of the checkpoint at every registration: it
    changes whenever a file is rewritten (a new mtime), which is what a cache needs to
    tell two versions apart, but a change that keeps size and mtime goes unseen.

    Parameters
    ----------
    root
        An existing directory.
    exclude
        Called with each path relative to ``root``; ``True`` drops the entry and, for a
        directory, everything below it.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        if not os.path.exists(root):
            raise FileNotFoundError(f"cannot build a manifest of {root!r}: it does not exist")
        raise NotADirectoryError(f"cannot build a manifest of {root!r}: not a directory")
    files: list[FileEntry] = []
    directories: list[str] = []
    symlinks: list[tuple[str, str]] = []
    identity: list[tuple[str, str, int, int, int]] = []
    for kind, relpath, value in plan_tree(root, exclude):
        if kind == "file":
            assert isinstance(value, str)
            st = os.stat(value)
            entry = FileEntry(relpath, st.st_size, stat.S_IMODE(st.st_mode) & 0o777)
            files.append(entry)
            identity.append(("f", relpath, entry.size, st.st_mtime_ns, entry.mode))
        elif kind == "directory":
            directories.append(relpath)
            identity.append(("d", relpath, 0, 0, 0))
        else:
            assert isinstance(value, str)
            symlinks.append((relpath, value))
            identity.append(("l", f"{relpath}\x00{value}", 0, 0, 0))
    digest = hashlib.sha256(json.dumps(sorted(identity)).encode("utf-8")).hexdigest()
    return Manifest(tuple(files), tuple(directories), tuple(symlinks), digest)


# --- chunk frames ----------------------------------------------------------------------


def encode_chunk(raw: memoryview | bytes | bytearray, *, compress: bool | None = None) -> bytes:
    """One chunk frame: :data:`CHUNK_HEADER` followed by the (maybe compressed) bytes.

    Parameters
    ----------
    raw
        The chunk's bytes; not kept.
    compress
        ``True`` or ``False`` forces lz4 on or off. ``None`` follows
        ``dckpt.transfer.compression``: ``"lz4"``, ``"none"``, or ``"auto"``, which
        compresses when a 64 KiB sample from the middle of the chunk shrinks below 90%
        and the whole chunk then shrinks at all.
    """
    view = memoryview(raw)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    crc = zlib.crc32(view)
    payload: bytes | memoryview = view
    flags = 0
    if compress is None:
        mode = _compression()
        compress = mode == "lz4" or (mode == "auto" and _sample_compresses(view))
        if compress:
            payload = lz4.block.compress(view, store_size=False)
            if len(payload) >= len(view):  # the sample misled us: send it raw
                payload, compress = view, False
    elif compress:
        payload = lz4.block.compress(view, store_size=False)
    if compress:
        flags |= _FLAG_LZ4
    # One copy into the result, whatever the payload (a join does not concatenate twice).
    return b"".join((CHUNK_HEADER.pack(flags, len(view), crc), payload))


def _sample_compresses(view: memoryview) -> bool:
    start = max(0, (len(view) - _SAMPLE_BYTES) // 2)
    sample = view[start : start + _SAMPLE_BYTES]
    return len(lz4.block.compress(sample, store_size=False)) < _MIN_RATIO * len(sample)


def decode_chunk(
    frame: bytes | bytearray | memoryview,
    spec: ChunkSpec,
    out: memoryview | bytearray | None = None,
) -> memoryview:
    """The raw bytes of a chunk frame, checked against ``spec`` and its crc32.

    Parameters
    ----------
    frame
        What :func:`encode_chunk` returned for the chunk ``spec``.
    spec
        The chunk that was asked for: its length must match the frame's.
    out
        Where to put the bytes; at least ``spec.length`` long. Without it, the result
        is a view into ``frame`` (uncompressed) or into a new ``bytes``.

    Raises
    ------
    CorruptChunkError
        A truncated frame, unknown flags, a length other than ``spec.length``, an lz4
        block that does not decompress to it, or a crc32 mismatch.
    """
    view = memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if len(view) < CHUNK_HEADER.size:
        raise _corrupt(spec, f"the frame is {len(view)} bytes, shorter than its header")
    flags, length, crc = CHUNK_HEADER.unpack(view[: CHUNK_HEADER.size])
    payload = view[CHUNK_HEADER.size :]
    if flags & ~_KNOWN_FLAGS:
        raise _corrupt(spec, f"unknown flags {flags:#04x}")
    # Checked before decompressing: the header's length sizes the output buffer.
    if length != spec.length:
        raise _corrupt(spec, f"the frame holds {length} bytes, not {spec.length}")
    data: memoryview
    if flags & _FLAG_LZ4:
        try:
            data = memoryview(lz4.block.decompress(payload, uncompressed_size=length))
        except lz4.block.LZ4BlockError as e:
            raise _corrupt(spec, f"its lz4 block does not decompress ({e})") from e
        if len(data) != length:
            raise _corrupt(spec, f"its lz4 block decompresses to {len(data)} bytes, not {length}")
    else:
        if len(payload) != length:
            raise _corrupt(spec, f"its payload is {len(payload)} bytes, not {length}")
        data = payload
    actual = zlib.crc32(data)
    if actual != crc:
        raise _corrupt(spec, f"crc32 {actual:#010x} of its bytes, header says {crc:#010x}")
    if out is None:
        return data
    target = memoryview(out)
    if len(target) < length:
        raise ValueError(f"out holds {len(target)} bytes, the chunk {length}")
    target[:length] = data
    return target[:length]


def _corrupt(spec: ChunkSpec, problem: str) -> CorruptChunkError:
    return CorruptChunkError(
        f"corrupt chunk of file #{spec.file_index} at offset {spec.offset} "
        f"({spec.length} bytes): {problem}"
    )


# --- sender ----------------------------------------------------------------------------


class _OpenFile:
    """A descriptor of a :class:`ChunkSource` and how many reads use it right now."""

    __slots__ = ("fd", "users", "retired")

    fd: int
    users: int
    retired: bool

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.retired = False


class ChunkSource:
    """Sender side: serves the chunks of one directory, as its manifest describes it.

    Thread-safe: reads use ``os.preadv`` (no shared file offset), each into one of a
    few reused buffers of ``chunk_bytes`` (one per concurrent reader), so memory grows
    by two chunks per concurrent call, not per call. Files are opened on first use and
    at most 64 stay open; a descriptor is closed only once no read uses it, so it can
    never be reused under a reader's feet.

    A file that no longer has the size the manifest gives, or is gone, raises
    :class:`~dckpt.errors.CheckpointFormatError`: the directory changed after it was
    registered, and the receiver must not get a mix of two versions.

    Parameters
    ----------
    root
        The directory the manifest was built from.
    manifest
        Its manifest; only its files are served.
    chunk_bytes
        The largest chunk served; ``dckpt.transfer.chunk-bytes`` when ``None``.
    """

    root: str
    manifest: Manifest
    chunk_bytes: int
    _lock: threading.Lock
    _files: collections.OrderedDict[int, _OpenFile]
    _buffers: list[bytearray]
    _closed: bool

    def __init__(
        self,
        root: str | os.PathLike[str],
        manifest: Manifest,
        chunk_bytes: int | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.manifest = manifest
        self.chunk_bytes = _check_chunk_bytes(
            _config_chunk_bytes() if chunk_bytes is None else chunk_bytes
        )
        self._lock = threading.Lock()
        self._files = collections.OrderedDict()
        self._buffers = []
        self._closed = False

    def __enter__(self) -> ChunkSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_chunk(self, spec: ChunkSpec) -> bytes:
        """The encoded frame (:func:`encode_chunk`) of one chunk.

        Raises
        ------
        ValueError
            ``spec`` is not a chunk of a manifest file, or is longer than
            ``chunk_bytes``.
        CheckpointFormatError
            The file changed (size, type) or vanished since the manifest was built.
        """
        entry = self._check(spec)
        handle = self._acquire(spec.file_index, entry)
        try:
            buffer = self._take_buffer()
            try:
                with memoryview(buffer)[: spec.length] as view:
                    self._read_into(handle.fd, view, spec, entry)
                    return encode_chunk(view)
            finally:
                self._give_buffer(buffer)
        finally:
            self._release(handle)

    def close(self) -> None:
        """Close the files; reads in progress finish first, later ones raise."""
        with self._lock:
            self._closed = True
            handles = list(self._files.values())
            self._files.clear()
            self._buffers.clear()
            for handle in handles:
                self._retire(handle)

    def _check(self, spec: ChunkSpec) -> FileEntry:
        files = self.manifest.files
        if not 0 <= spec.file_index < len(files):
            raise ValueError(f"no file #{spec.file_index} in this manifest of {len(files)} files")
        entry = files[spec.file_index]
        if not (0 <= spec.offset and 0 < spec.length <= self.chunk_bytes
                and spec.offset + spec.length <= entry.size):
            raise ValueError(
                f"no chunk of {spec.length} bytes at offset {spec.offset} in {entry.path!r} "
                f"({entry.size} bytes, chunks of at most {self.chunk_bytes} bytes)"
            )
        return entry

    def _path(self, entry: FileEntry) -> str:
        return os.path.join(self.root, *entry.path.split("/"))

    def _acquire(self, index: int, entry: FileEntry) -> _OpenFile:
        with self._lock:
            if self._closed:
                raise ValueError("this ChunkSource is closed")
            handle = self._files.get(index)
            if handle is None:
                handle = _OpenFile(self._open(entry))
                self._files[index] = handle
                self._evict()
            self._files.move_to_end(index)
            handle.users += 1
            return handle

    def _open(self, entry: FileEntry) -> int:
        path = self._path(entry)
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError as e:
            raise _changed(path, "is gone") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _changed(path, "is no longer a regular file")
            if st.st_size != entry.size:
                raise _changed(path, f"has {st.st_size} bytes, not {entry.size}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _evict(self) -> None:
        # Oldest first; a file being read stays open until its reads end.
        for index in list(self._files):
            if len(self._files) <= _MAX_OPEN_FILES:
                break
            handle = self._files[index]
            if handle.users == 0:
                del self._files[index]
                self._retire(handle)

    def _retire(self, handle: _OpenFile) -> None:
        handle.retired = True
        if handle.users == 0:
            os.close(handle.fd)

    def _release(self, handle: _OpenFile) -> None:
        with self._lock:
            handle.users -= 1
            if handle.retired and handle.users == 0:
                os.close(handle.fd)

    def _take_buffer(self) -> bytearray:
        with self._lock:
            if self._buffers:
                return self._buffers.pop()
        return bytearray(self.chunk_bytes)

    def _give_buffer(self, buffer: bytearray) -> None:
        with self._lock:
            if not self._closed:
                self._buffers.append(buffer)

    def _read_into(self, fd: int, view: memoryview, spec: ChunkSpec, entry: FileEntry) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], spec.offset + done)
            if n == 0:
                raise _changed(
                    self._path(entry),
                    f"ends at byte {spec.offset + done}, before the {entry.size} bytes "
                    "of the manifest",
                )
            done += n


def _changed(path: str, how: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path!r} {how}: the directory changed after its manifest was built; "
        "register it again (a checkpoint must not change once registered)"
    )


# --- receiver --------------------------------------------------------------------------


async def receive_directory(
    manifest: Manifest,
    fetch_chunk: Callable[[ChunkSpec], Awaitable[bytes | memoryview]],
    target: str | os.PathLike[str],
    *,
    chunk_bytes: int | None = None,
    max_in_flight: int | None = None,
    retries: int | None = None,
    callback: Callback = DEFAULT_CALLBACK,
) -> None:
    """Build the directory that ``manifest`` describes at ``target``, chunk by chunk.

    Runs on the event loop; blocking work goes to threads (``asyncio.to_thread``):
    creating the tree, decoding and writing each chunk, the final rename. The tree is
    built in a hidden sibling of ``target`` (``.{name}.{uuid}.partial``), which
    replaces ``target`` (if it exists) by a rename once every chunk is written; on any
    failure, or cancellation, it is removed and the error raised.

    Each file is created at its full size (``os.ftruncate``), so chunks land in any
    order with ``os.pwrite``. At most ``max_in_flight`` chunks are fetched, decoded
    or written at once, which bounds memory to about that many chunks. A chunk that
    fails its checks is fetched again, ``retries`` times at most, with a warning each
    time. Symlinks are created last, then file modes (``mode & 0o777``) applied;
    directories get the default mode.

    Parameters
    ----------
    manifest
        What to build; its paths are checked again here, however it was made.
    fetch_chunk
        Returns the frame (:func:`encode_chunk`) of a chunk, e.g. by asking the
        sender's :meth:`ChunkSource.read_chunk`.
    target
        Where the directory goes; its parent is created if needed.
    chunk_bytes
        Size of the chunks asked for; ``dckpt.transfer.chunk-bytes`` when ``None``.
        Must not exceed the sender's.
    max_in_flight
        ``dckpt.transfer.max-in-flight`` when ``None``.
    retries
        ``dckpt.transfer.retries`` when ``None``.
    callback
        ``set_size(total bytes)``, then ``relative_update(length)`` per chunk written.

    Raises
    ------
    CorruptChunkError
        A chunk still failed its checks after ``retries`` fetches again.
    UnsafePathError, CheckpointFormatError
        The manifest is unsafe or malformed.
    """
    # A Manifest can be built by hand: check it as if it came off the wire.
    manifest = Manifest.from_dict(manifest.to_dict())
    chunk_bytes = _check_chunk_bytes(_config_chunk_bytes() if chunk_bytes is None else chunk_bytes)
    if max_in_flight is None:
        max_in_flight = int(dask.config.get("dckpt.transfer.max-in-flight"))
    if retries is None:
        retries = int(dask.config.get("dckpt.transfer.retries"))
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    if retries < 0:
        raise ValueError(f"retries must be at least 0, got {retries}")
    callback.set_size(manifest.total_bytes)
    started = time.perf_counter()
    async with _building(target) as staging:
        paths = [os.path.join(staging, *entry.path.split("/")) for entry in manifest.files]
        await asyncio.to_thread(_create_tree, staging, manifest, paths)

        async def receive(spec: ChunkSpec) -> None:
            for attempt in range(retries + 1):
                frame = await fetch_chunk(spec)
                try:
                    # In a thread, so the loop keeps serving the comms that bring the next
                    # chunks. It also pays in one process: 512 MiB of random files in 8 MiB
                    # chunks, 4 in flight, with read_chunk called on the loop, took a
                    # median 0.45 s against 0.58 s with decode + pwrite on the loop
                    # (11 runs each, this 2-core VM, warm page cache).
                    await asyncio.to_thread(_write_chunk, frame, spec, paths[spec.file_index])
                    break
                except CorruptChunkError as e:
                    del frame
                    name = manifest.files[spec.file_index].path
                    if attempt == retries:
                        raise CorruptChunkError(
                            f"{name!r}: {e}; still corrupt after {retries + 1} fetches, "
                            "check the network and the sender's disk"
                        ) from e
                    logger.warning("%r: %s; fetching it again (retry %d of %d)",
                                   name, e, attempt + 1, retries)
            callback.relative_update(spec.length)

        await _run_bounded(receive, manifest.chunks(chunk_bytes), max_in_flight)
        await asyncio.to_thread(_finish_tree, staging, manifest, paths)
    logger.debug("received %d files, %d bytes into %s in %.2f s", len(manifest.files),
                 manifest.total_bytes, os.fspath(target), time.perf_counter() - started)


@contextlib.asynccontextmanager
async def _building(target: str | os.PathLike[str]) -> AsyncIterator[str]:
    """:func:`~dckpt.formats._atomic.atomic_directory`, with its disk work in threads.

    Removing a large partial directory, or an old ``target``, can take a while; the
    event loop must not wait for it.
    """
    manager = atomic_directory(target)
    staging = await asyncio.to_thread(manager.__enter__)
    try:
        yield staging
    except BaseException as e:
        await asyncio.to_thread(manager.__exit__, type(e), e, e.__traceback__)
        raise
    await asyncio.to_thread(manager.__exit__, None, None, None)


async def _run_bounded(
    receive: Callable[[ChunkSpec], Awaitable[None]], specs: list[ChunkSpec], limit: int
) -> None:
    """``receive`` every spec, ``limit`` at a time; the first error cancels the rest.

    A fixed set of workers draws from one iterator, rather than a task per chunk
    behind a semaphore: a checkpoint of 100 GiB in 1 MiB chunks would otherwise hold
    100 000 waiting tasks.
    """
    pending = iter(specs)

    async def worker() -> None:
        for spec in pending:  # one event loop thread: next() needs no lock
            await receive(spec)

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(specs)))]
    if not tasks:
        return
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _create_tree(staging: str, manifest: Manifest, paths: list[str]) -> None:
    """Directories, then every file at its full size (thread)."""
    for name in manifest.directories:
        os.makedirs(os.path.join(staging, *name.split("/")), exist_ok=True)
    for entry, path in zip(manifest.files, paths):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            if entry.size:
                os.ftruncate(fd, entry.size)
        finally:
            os.close(fd)


def _write_chunk(frame: bytes | memoryview, spec: ChunkSpec, path: str) -> None:
    """Decode one frame and write it in place (thread)."""
    data = decode_chunk(frame, spec)
    # No O_CREAT: a write that outlives a cancelled transfer cannot recreate anything
    # in the partial directory being removed.
    fd = os.open(path, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], spec.offset + done)
    finally:
        os.close(fd)


def _finish_tree(staging: str, manifest: Manifest, paths: list[str]) -> None:
    """Symlinks (only now that every file is written), then file modes (thread)."""
    for name, link_target in manifest.symlinks:
        path = os.path.join(staging, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(link_target, path)
    for entry, path in zip(manifest.files, paths):
        os.chmod(path, entry.mode & 0o777)


# --- settings --------------------------------------------------------------------------


def _config_chunk_bytes() -> int:
    return parse_bytes(dask.config.get("dckpt.transfer.chunk-bytes"))


def _check_chunk_bytes(chunk_bytes: int) -> int:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or not (
        1 <= chunk_bytes <= _MAX_CHUNK_BYTES
    ):
        raise ValueError(
            f"chunk size {chunk_bytes!r} is not an integer between 1 and {_MAX_CHUNK_BYTES} "
            "bytes; check dckpt.transfer.chunk-bytes"
        )
    return chunk_bytes


def _compression() -> Compression:
    value = dask.config.get("dckpt.transfer.compression")
    if value not in ("auto", "lz4", "none"):
        raise ValueError(
            f"dckpt.transfer.compression is {value!r}; expected 'auto', 'lz4' or 'none'"
        )
    return value  # type: ignore[no-any-return]
