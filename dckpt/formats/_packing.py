"""The packed byte format: a directory tree as one checksummed, streamable archive.

Used by ``Checkpoint.to_bytes()`` and for streaming a checkpoint over a socket.
Wire format, version 1::

    header (12 bytes, uncompressed)   MAGIC, version: uint16, flags: uint16 (big-endian)
    body   (one lz4 frame, block and content checksums) holding records:
        kind: 1 byte (F file, D directory, L symlink, Z end), mode: uint32,
        size: uint64, path_len: uint32, path (UTF-8), then ``size`` payload bytes
        (file contents for F, UTF-8 link target for L, nothing for D).
    The Z record has an empty path and counts the records before it in ``size``.
    Nothing may follow the lz4 frame.

Writer and reader stream: memory stays at a few MiB whatever the file sizes. The
reader checks every path and link target (see :class:`EntryIndex`) before it yields
an entry, and nothing here ever unpickles anything.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import dask.config
import lz4.frame
from dask.utils import parse_bytes
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt.errors import CheckpointError, CheckpointFormatError
from dckpt.formats._atomic import atomic_directory, partial_sibling
from dckpt.formats._paths import EntryIndex, EntryKind, safe_relpath
from dckpt.formats._tree import plan_tree

logger = logging.getLogger(__name__)

MAGIC = b"\x89DCKPT\r\n"
FORMAT_VERSION = 1

_HEADER = struct.Struct(">8sHH")
_RECORD = struct.Struct(">cIQI")
_KNOWN_FLAGS = 0
_Kind = EntryKind
_KINDS: dict[bytes, _Kind] = {b"F": "file", b"D": "directory", b"L": "symlink"}
_CODES = {kind: code for code, kind in _KINDS.items()}
# Longer names or link targets than any filesystem allows mean a damaged record; the
# cap keeps a hostile length from making us buffer gigabytes.
_MAX_NAME_BYTES = 64 * 1024
# Reader I/O sizes: one input chunk plus one output chunk bounds the reader's memory.
_INPUT_CHUNK = 1 << 20
_OUTPUT_CHUNK = 1 << 20
# python-lz4 allocates compressBound(len) twice per compress() call, so feed it at most
# this much at once (tests/test_packing.py::test_bounded_memory_for_a_64_mib_file
# measures the peak).
_COMPRESS_SLICE = 1 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def is_packed(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` starts with the packed format's magic bytes."""
    return bytes(memoryview(data)[: len(MAGIC)]) == MAGIC


@dataclass(frozen=True)
class ArchiveEntry:
    """One entry of an archive, as :class:`ArchiveReader` yields it.

    ``path`` has passed :func:`~dckpt.formats._paths.safe_relpath`; ``mode`` is the
    record's value as stored (:func:`unpack_to_directory` keeps only permission bits);
    ``size`` is the payload length; ``target`` is set for symlinks only.
    """

    kind: _Kind
    path: str
    mode: int
    size: int
    target: str | None = None


class ArchiveWriter:
    """Write the packed format to a binary stream (file, socket makefile, ``BytesIO``).

    Files are streamed in chunks of ``dckpt.formats.write-chunk-bytes``, never held
    whole. Use as a context manager: on a clean exit :meth:`close` writes the end
    record and finishes the lz4 frame (``out`` stays open). If the block raises, or an
    entry fails half-written, no end record is written, so readers refuse the partial
    output as truncated. Every path passes ``safe_relpath`` and the checks readers
    make, so the writer cannot produce an archive that would be refused.

    Parameters
    ----------
    out
        Where the bytes go; written to at once (the header).
    compression_level
        lz4 level; ``dckpt.formats.compression-level`` when ``None``.
    """

    _out: BinaryIO
    _compressor: lz4.frame.LZ4FrameCompressor
    _index: EntryIndex
    _count: int
    _closed: bool
    _broken: bool

    def __init__(self, out: BinaryIO, *, compression_level: int | None = None) -> None:
        if compression_level is None:
            compression_level = int(dask.config.get("dckpt.formats.compression-level"))
        self._out = out
        self._compressor = lz4.frame.LZ4FrameCompressor(
            compression_level=compression_level, content_checksum=True, block_checksum=True
        )
        self._index = EntryIndex()
        self._count = 0
        self._closed = False
        self._broken = False
        out.write(_HEADER.pack(MAGIC, FORMAT_VERSION, 0) + self._compressor.begin())

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._broken = True
            self._closed = True

    def add_bytes(self, relpath: str, data: bytes, *, mode: int = 0o644) -> None:
        """Add a file with content ``data``."""
        relpath = self._register(relpath, "file")
        view = memoryview(data).cast("B")
        with self._writing():
            self._write_record("file", mode, view.nbytes, relpath)
            self._write(view)

    def add_file(
        self,
        relpath: str,
        path: str | os.PathLike[str],
        *,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> None:
        """Add the file at ``path`` (symlinks followed), streamed in chunks.

        The size recorded is the opened file's; a file that changes size while it is
        read raises :class:`~dckpt.errors.CheckpointError` and leaves the writer
        unusable. ``callback`` gets ``set_size(bytes)`` and one update per chunk.
        """
        self._check_open()
        relpath = safe_relpath(relpath)
        chunk_bytes = parse_bytes(dask.config.get("dckpt.formats.write-chunk-bytes"))
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"cannot pack {os.fspath(path)!r}: not a regular file")
            size = st.st_size
            self._register(relpath, "file")
            callback.set_size(size)
            with self._writing():
                self._write_record("file", st.st_mode, size, relpath)
                buffer = memoryview(bytearray(max(1, min(chunk_bytes, size))))
                remaining = size
                while remaining:
                    n = f.readinto(buffer[: min(remaining, len(buffer))])
                    if not n:
                        raise _changed(path, size, "shrank from")
                    self._write(buffer[:n])
                    remaining -= n
                    callback.relative_update(n)
                if f.read(1):
                    raise _changed(path, size, "grew beyond")

    def add_directory(self, relpath: str, *, mode: int = 0o755) -> None:
        """Add a directory (so that it exists after unpacking even when empty)."""
        relpath = self._register(relpath, "directory")
        with self._writing():
            self._write_record("directory", mode, 0, relpath)

    def add_symlink(self, relpath: str, target: str) -> None:
        """Add a relative symlink; one leading outside the tree raises ``UnsafePathError``."""
        relpath = self._register(relpath, "symlink", target)
        encoded = target.encode("utf-8")
        with self._writing():
            self._write_record("symlink", 0o777, len(encoded), relpath)
            self._write(encoded)

    def add_tree(
        self,
        root: str | os.PathLike[str],
        *,
        prefix: str = "",
        exclude: Callable[[str], bool] | None = None,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> None:
        """Add everything below ``root``, in sorted order, under ``prefix``.

        Directories become entries of their own (empty ones survive). A symlink whose
        relative target stays inside ``root`` (decided lexically, with every ``..``
        leading) is kept as a symlink; any other is dereferenced as ``shutil.copytree``
        does, as is every symlink below a dereferenced directory. Dangling outside links,
        sockets, FIFOs, devices and directory cycles are skipped with a warning.

        Parameters
        ----------
        root
            The directory to add. With a ``prefix``, the prefix itself is added as a
            directory carrying ``root``'s mode.
        prefix
            Prepended to every entry's path.
        exclude
            Called with each path relative to ``root`` (``/``-separated, no prefix);
            ``True`` drops the entry and, for a directory, everything below it.
        callback
            ``set_size(number of files)``, a branched child per file for its bytes,
            and ``relative_update(1)`` after each file.
        """
        self._check_open()
        root = os.fspath(root)
        root_stat = os.stat(root)
        if not stat.S_ISDIR(root_stat.st_mode):
            raise NotADirectoryError(f"cannot pack {root!r}: not a directory")
        plan = plan_tree(root, exclude)
        callback.set_size(sum(1 for kind, _, _ in plan if kind == "file"))
        if prefix:
            self.add_directory(prefix, mode=root_stat.st_mode)

        def full(relpath: str) -> str:
            return f"{prefix}/{relpath}" if prefix else relpath

        for kind, relpath, value in plan:
            if kind == "directory":
                assert isinstance(value, int)
                self.add_directory(full(relpath), mode=value)
            elif kind == "symlink":
                assert isinstance(value, str)
                self.add_symlink(full(relpath), value)
            else:
                assert isinstance(value, str)
                with callback.branched(value, full(relpath)) as child:
                    self.add_file(full(relpath), value, callback=child)
                callback.relative_update(1)

    def close(self) -> None:
        """Write the end record and finish the lz4 frame; ``out`` stays open."""
        if self._closed:
            return
        self._closed = True
        if self._broken:
            return
        self._write(_RECORD.pack(b"Z", 0, self._count, 0))
        self._out.write(self._compressor.flush())
        self._out.flush()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this ArchiveWriter is closed")
        if self._broken:
            raise CheckpointError("an earlier entry failed half-written; the archive is unusable")

    def _register(self, relpath: str, kind: _Kind, target: str | None = None) -> str:
        self._check_open()
        relpath = safe_relpath(relpath)
        self._index.add(relpath, kind, target)
        return relpath

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Mark the writer broken if an entry fails after its first byte was written."""
        try:
            yield
        except BaseException:
            self._broken = True
            raise
        self._count += 1

    def _write_record(self, kind: _Kind, mode: int, size: int, relpath: str) -> None:
        encoded = relpath.encode("utf-8")
        self._write(_RECORD.pack(_CODES[kind], mode & 0o777, size, len(encoded)) + encoded)

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), _COMPRESS_SLICE):
            compressed = self._compressor.compress(view[start : start + _COMPRESS_SLICE])
            if compressed:
                self._out.write(compressed)


def _changed(path: str | os.PathLike[str], size: int, how: str) -> CheckpointError:
    return CheckpointError(
        f"{os.fspath(path)!r} {how} {size} bytes while it was being packed; "
        "pack only files that nobody is writing to"
    )


class ArchiveReader:
    """Read the packed format from a binary stream, one entry at a time.

    Memory stays at a few MiB whatever the entry sizes. After an entry is yielded,
    read its payload with :meth:`read_payload` or :meth:`copy_payload` before
    advancing; an unread payload is skipped. When iteration ends, the reader has
    checked the entry count, the end of the lz4 frame and that nothing follows it
    (reading ``inp`` to its end). Damage of any kind raises
    :class:`~dckpt.errors.CheckpointFormatError`; unsafe paths raise its subclass
    :class:`~dckpt.errors.UnsafePathError`. A reader can be iterated once.

    Parameters
    ----------
    inp
        The stream; its header is read and checked at once.
    """

    _inp: BinaryIO
    _what: str
    _decompressor: lz4.frame.LZ4FrameDecompressor
    _buffer: bytes
    _pos: int
    _index: EntryIndex
    _entry: ArchiveEntry | None
    _remaining: int
    _payload_started: bool
    _started: bool

    def __init__(self, inp: BinaryIO) -> None:
        self._inp = inp
        name = getattr(inp, "name", None)
        self._what = repr(name) if isinstance(name, str) else "the packed data"
        _check_header(_read_exactly(inp, _HEADER.size), self._what)
        self._decompressor = lz4.frame.LZ4FrameDecompressor()
        self._buffer = b""
        self._pos = 0
        self._index = EntryIndex()
        self._entry = None
        self._remaining = 0
        self._payload_started = False
        self._started = False

    def __iter__(self) -> Iterator[ArchiveEntry]:
        if self._started:
            raise RuntimeError("an ArchiveReader can be iterated only once")
        self._started = True
        count = 0
        while True:
            while self._remaining:  # skip a payload the caller did not read
                self._remaining -= len(self._take_some(self._remaining))
            self._entry = None
            code, mode, size, path_len = _RECORD.unpack(self._take(_RECORD.size))
            if code == b"Z":
                self._check_end(mode, size, path_len, count)
                return
            self._entry = self._read_entry(code, mode, size, path_len)
            self._remaining = size if self._entry.kind == "file" else 0
            self._payload_started = False
            count += 1
            yield self._entry

    def read_payload(self) -> bytes:
        """The current file entry's content, whole."""
        out = io.BytesIO()
        self.copy_payload(out)
        return out.getvalue()

    def copy_payload(self, out: BinaryIO, *, callback: Callback = DEFAULT_CALLBACK) -> None:
        """Stream the current file entry's content to ``out`` in chunks of at most 1 MiB."""
        entry = self._entry
        if entry is None or entry.kind != "file":
            raise RuntimeError(f"no file payload to read here (current entry: {entry})")
        if self._payload_started:
            raise RuntimeError(f"the payload of {entry.path!r} was already read")
        self._payload_started = True
        callback.set_size(entry.size)
        while self._remaining:
            chunk = self._take_some(self._remaining)
            self._remaining -= len(chunk)
            out.write(chunk)
            callback.relative_update(len(chunk))

    def _read_entry(self, code: bytes, mode: int, size: int, path_len: int) -> ArchiveEntry:
        kind = _KINDS.get(code)
        if kind is None:
            raise self._damaged(f"holds a record of unknown kind {code!r}")
        if path_len > _MAX_NAME_BYTES or (kind == "symlink" and size > _MAX_NAME_BYTES):
            raise self._damaged("holds an overlong name")
        if kind == "directory" and size:
            raise self._damaged("holds a directory with a payload")
        path = safe_relpath(self._decode(self._take(path_len), "path"))
        target = self._decode(self._take(size), "symlink target") if kind == "symlink" else None
        self._index.add(path, kind, target)
        return ArchiveEntry(kind=kind, path=path, mode=mode, size=size, target=target)

    def _check_end(self, mode: int, size: int, path_len: int, count: int) -> None:
        if mode or path_len:
            raise self._damaged("has a malformed end record")
        if size != count:
            raise self._damaged(f"has an end record counting {size} entries, but {count} were read")
        if self._pos < len(self._buffer) or self._fill():
            raise self._damaged("holds data after its end record")
        if self._decompressor.unused_data or self._inp.read(1):
            raise self._damaged("has trailing bytes after the end of the archive")

    def _damaged(self, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(
            f"{self._what} {problem}: it is damaged, or not written by this version of dckpt"
        )

    def _decode(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._damaged(f"holds a {what} that is not UTF-8 ({raw[:40]!r})") from e

    def _take(self, n: int) -> bytes:
        """Exactly ``n`` decompressed bytes (``n`` is small: a record header or a name)."""
        while len(self._buffer) - self._pos < n:
            if not self._fill():
                raise self._truncated("its compressed body ends inside a record")
        data = self._buffer[self._pos : self._pos + n]
        self._pos += n
        return data

    def _take_some(self, limit: int) -> bytes:
        """Between 1 and ``limit`` decompressed bytes."""
        if self._pos == len(self._buffer) and not self._fill():
            raise self._truncated("its compressed body ends inside a file")
        data = self._buffer[self._pos : self._pos + limit]
        self._pos += len(data)
        return data

    def _fill(self) -> bool:
        """Decompress more into the buffer; ``False`` once the lz4 frame has ended."""
        decompressor = self._decompressor
        while not decompressor.eof:
            if decompressor.needs_input:
                raw = self._inp.read(_INPUT_CHUNK)
                if not raw:
                    raise self._truncated("the data ends before the archive does")
            else:
                raw = b""
            try:
                out = decompressor.decompress(raw, max_length=_OUTPUT_CHUNK)
            except RuntimeError as e:  # how python-lz4 reports bad checksums and headers
                raise CheckpointFormatError(
                    f"{self._what} is corrupted ({e}); fetch or write it again"
                ) from e
            if out:
                self._buffer = self._buffer[self._pos :] + out
                self._pos = 0
                return True
        return False

    def _truncated(self, where: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self._what} is truncated: {where}; fetch or write it again")


def _read_exactly(inp: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = inp.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _check_header(header: bytes, what: str) -> None:
    if not header:
        raise CheckpointFormatError(
            f"{what} is empty; expected bytes written by Checkpoint.to_bytes()"
        )
    if not MAGIC.startswith(header[: len(MAGIC)]):
        raise CheckpointFormatError(
            f"{what} has no dckpt header (starts with {header[:8]!r}); "
            "was it written by Checkpoint.to_bytes()?"
        )
    if len(header) < _HEADER.size:
        raise CheckpointFormatError(f"{what} is truncated: it ends inside the dckpt header")
    _, version, flags = _HEADER.unpack(header)
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{what} uses packed format version {version}, but this dckpt reads version "
            f"{FORMAT_VERSION} only; read it with the dckpt version that wrote it"
        )
    if flags & ~_KNOWN_FLAGS:
        raise CheckpointFormatError(
            f"{what} sets unknown format flags {flags:#06x} (this dckpt knows "
            f"{_KNOWN_FLAGS:#06x}); was it written by a newer dckpt?"
        )


def pack_directory(
    root: str | os.PathLike[str],
    out: BinaryIO,
    *,
    exclude: Callable[[str], bool] | None = None,
    callback: Callback = DEFAULT_CALLBACK,
) -> None:
    """Write the tree below ``root`` to ``out`` in the packed format.

    See :meth:`ArchiveWriter.add_tree` for symlinks, ``exclude`` and ``callback``.
    """
    with ArchiveWriter(out) as writer:
        writer.add_tree(root, exclude=exclude, callback=callback)


def pack_directory_to_bytes(
    root: str | os.PathLike[str], *, exclude: Callable[[str], bool] | None = None
) -> bytes:
    """The tree below ``root`` in the packed format, as bytes."""
    out = io.BytesIO()
    pack_directory(root, out, exclude=exclude)
    return out.getvalue()


def pack_directory_to_file(
    root: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    exclude: Callable[[str], bool] | None = None,
    callback: Callback = DEFAULT_CALLBACK,
) -> None:
    """Write the tree below ``root`` to the file ``path`` in the packed format.

    Streams (memory stays at a few MiB whatever the tree's size) into a hidden sibling
    of ``path``, renamed into place once complete: ``path`` holds the old file or the
    whole new one, never a part. An existing ``path`` is replaced. See
    :func:`pack_directory` for ``exclude`` and ``callback``.
    """
    path = os.path.abspath(os.fspath(path))
    staging = partial_sibling(path)
    try:
        with open(staging, "wb") as out:
            pack_directory(root, out, exclude=exclude, callback=callback)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


def unpack_directory(
    inp: BinaryIO,
    target: str | os.PathLike[str],
    *,
    callback: Callback = DEFAULT_CALLBACK,
) -> None:
    """Unpack the archive read from the stream ``inp`` into the directory ``target``.

    Streams, as :func:`unpack_to_directory` (with its checks: paths and link targets
    that would leave ``target``, truncation, checksums) into a hidden sibling of
    ``target`` that is renamed into place only once the whole archive has been read and
    checked. On error nothing is left behind and an existing ``target`` is untouched;
    on success an existing ``target`` is replaced as a whole.
    """
    with atomic_directory(target) as partial:
        unpack_to_directory(inp, partial, callback=callback)


def unpack_to_directory(
    inp: BinaryIO | bytes | bytearray | memoryview,
    target: str | os.PathLike[str],
    *,
    callback: Callback = DEFAULT_CALLBACK,
) -> None:
    """Write the archive read from ``inp`` into ``target``, an existing empty directory.

    Nothing is written outside ``target``: paths are checked by the reader, files are
    created with ``O_EXCL | O_NOFOLLOW``, and symlinks are created last, once the whole
    archive has been read and checked. On error ``target`` is left half-filled: pass a
    partial sibling from ``_atomic.atomic_directory``, which removes it. Files keep
    their permission bits (``mode & 0o777``); directories also get ``0o700`` so they
    stay writable.

    Parameters
    ----------
    inp
        A binary stream or the packed bytes.
    target
        An existing, empty directory.
    callback
        ``relative_update(1)`` after each file, and a branched child per file for its
        bytes. ``set_size`` is not called: a stream does not say how many files it
        holds until its end.
    """
    if isinstance(inp, (bytes, bytearray, memoryview)):
        inp = io.BytesIO(inp)
    target = os.fspath(target)
    if os.listdir(target):
        raise ValueError(f"cannot unpack into {target!r}: the directory is not empty")
    reader = ArchiveReader(inp)
    links: list[ArchiveEntry] = []
    for entry in reader:
        dest = os.path.join(target, *entry.path.split("/"))
        if entry.kind == "symlink":
            links.append(entry)
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if entry.kind == "directory":
            if not os.path.isdir(dest):  # else already made as some entry's parent
                os.mkdir(dest, 0o700)
            os.chmod(dest, entry.mode & 0o777 | 0o700)
            continue
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f, callback.branched(entry.path, dest) as child:
            reader.copy_payload(f, callback=child)
            os.fchmod(f.fileno(), entry.mode & 0o777)
        callback.relative_update(1)
    for entry in links:
        assert entry.target is not None
        dest = os.path.join(target, *entry.path.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(entry.target, dest)
