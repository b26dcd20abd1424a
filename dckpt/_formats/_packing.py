"""The packed byte format: a directory tree as one checksummed, streamable archive.

Used by ``Checkpoint.to_bytes()``, ``dckpt cp`` and for streaming a checkpoint over a
socket. Every archive starts with a 12-byte header (big-endian, uncompressed)::

    MAGIC (8 bytes), version: uint16, flags: uint16 (none defined: 0)

Writers write version 2; readers read versions 1 and 2.

Version 2 (since issue 11): records, each protected by its own checksum, and file
contents in pieces, each stored raw or lz4-compressed as the piece's data decides::

    record  kind: 1 byte (F file, D directory, L symlink, Z end), mode: uint32,
            size: uint64, path_len: uint32, path (UTF-8, path_len bytes),
            extra (L: the UTF-8 link target, ``size`` bytes; Z: 8 bytes, below;
            else none), checksum: uint64 = xxh3_64 of all the record's bytes before it
    F only: pieces whose raw lengths add up to ``size`` (none for an empty file):
            stored_len: uint32, then one chunk frame of :mod:`dckpt._formats._frames`
            (flags: uint8, raw_len: uint64, xxh3_64 of the raw bytes: uint64,
            payload: ``stored_len`` bytes, raw or one lz4 block)
    Z       path_len 0, mode 0, ``size`` = the number of records before it; its extra
            is xxh3_64 over, in order, every record's checksum field and every piece's
            21 header bytes (stored_len and frame header), so a piece or record lost,
            repeated or moved is caught. Nothing may follow the Z record.

A file is cut into pieces of ``dckpt.formats.write-chunk-bytes`` (4 MiB; at most
:data:`MAX_PIECE_BYTES`). Each piece is compressed only when a 64 KiB sample of it
shrinks below 90% and the whole piece then shrinks at all -- the rule and the codec
the transfer uses for its chunks -- so model weights are stored as they are, at the
cost of one xxh3_64 (~29 GB/s), and text, JSON and zeros shrink.
``dckpt.formats.compression-level`` picks lz4's mode (below 3 fast, 3-16
high-compression at that level) for the pieces that are compressed.

Version 1 (read only): the same header, then ONE lz4 frame with block and content
checksums (xxh32) holding records ``kind, mode, size, path_len, path`` followed by
``size`` payload bytes (file contents for F, link target for L), the Z record
counting the records; nothing may follow the frame.

Writer and reader stream: memory stays at a few pieces whatever the file sizes (a
reader refuses pieces above :data:`MAX_PIECE_BYTES` and never sizes a buffer from an
unchecked length beyond that). The reader checks every record's checksum, path and
link target (see :class:`EntryIndex`) before it yields an entry, and each piece's
checksum by the end of the piece: a compressed piece before any of its bytes are
handed out, a raw one as its 256 KiB slices stream past (see
:meth:`ArchiveReader.copy_payload`). Nothing here ever unpickles anything.
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
from typing import BinaryIO, NamedTuple, cast

import dask.config
import lz4.frame
import xxhash
from dask.utils import parse_bytes
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt._formats._atomic import atomic_directory, atomic_file
from dckpt._formats._frames import (
    CHUNK_HEADER,
    FLAG_LZ4,
    bytes_view,
    check_checksum,
    decode_frame,
    encode_frame,
    lz4_bound,
)
from dckpt._formats._paths import EntryIndex, EntryKind, safe_relpath
from dckpt._formats._tree import plan_tree
from dckpt.errors import CheckpointError, CheckpointFormatError, CorruptChunkError

logger = logging.getLogger(__name__)

MAGIC = b"\x89DCKPT\r\n"
FORMAT_VERSION = 2
"""The version writers write."""
READ_VERSIONS = (1, 2)
"""The versions readers read."""
MAX_PIECE_BYTES = 64 << 20
"""The largest piece of a file a writer makes and a reader accepts."""

_HEADER = struct.Struct(">8sHH")
_RECORD = struct.Struct(">cIQI")
_CHECKSUM = struct.Struct(">Q")
_PIECE = struct.Struct(">I")  # stored_len, before the chunk frame's header
_PIECE_HEADER_SIZE = _PIECE.size + CHUNK_HEADER.size
_KNOWN_FLAGS = 0
_Kind = EntryKind
_KINDS: dict[bytes, _Kind] = {b"F": "file", b"D": "directory", b"L": "symlink"}
_CODES = {kind: code for code, kind in _KINDS.items()}
# Longer names or link targets than any filesystem allows mean a damaged record; the
# cap keeps a hostile length from making us buffer gigabytes.
_MAX_NAME_BYTES = 64 * 1024
# Version 1 reader I/O sizes: one input chunk plus one output chunk bounds its memory.
_INPUT_CHUNK = 1 << 20
_OUTPUT_CHUNK = 1 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Files and raw pieces are read and written in slices of this size (a reader hashes
# them as they pass): copies that stay in the CPU's cache cost about half the CPU of
# 4 MiB ones here when unpacking, and far less erratically when packing too (A/B on
# this project's machine, 1 GiB; see the commits that brought it in).
_IO_SLICE = 256 << 10


def is_packed(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` starts with the packed format's magic bytes."""
    return bytes(memoryview(data)[: len(MAGIC)]) == MAGIC


@dataclass(frozen=True)
class ArchiveEntry:
    """One entry of an archive, as :class:`ArchiveReader` yields it.

    ``path`` has passed :func:`~dckpt._formats._paths.safe_relpath`; ``mode`` is the
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

    Writes the current :data:`FORMAT_VERSION`. Files are streamed in pieces of
    ``dckpt.formats.write-chunk-bytes`` (capped at :data:`MAX_PIECE_BYTES`), never held
    whole, each stored raw or lz4-compressed as a sample of it decides. Use as a
    context manager: on a clean exit :meth:`close` writes the end record (``out``
    stays open). If the block raises, or an entry fails half-written, no end record is
    written, so readers refuse the partial output as truncated. Every path passes
    ``safe_relpath`` and the checks readers make, so the writer cannot produce an
    archive that would be refused.

    Parameters
    ----------
    out
        Where the bytes go; written to at once (the header).
    compression_level
        lz4 level for the pieces worth compressing (below 3 lz4's fast mode, 3-16
        its high-compression mode); ``dckpt.formats.compression-level`` when ``None``.
    """

    _out: BinaryIO
    _level: int
    _chain: xxhash.xxh3_64
    _index: EntryIndex
    _count: int
    _closed: bool
    _broken: bool

    def __init__(self, out: BinaryIO, *, compression_level: int | None = None) -> None:
        if compression_level is None:
            compression_level = int(dask.config.get("dckpt.formats.compression-level"))
        self._out = out
        self._level = compression_level
        self._chain = xxhash.xxh3_64()
        self._index = EntryIndex()
        self._count = 0
        self._closed = False
        self._broken = False
        out.write(_HEADER.pack(MAGIC, FORMAT_VERSION, 0))

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
        view = bytes_view(data)
        step = _piece_bytes()
        with self._writing():
            self._write_record("file", mode, view.nbytes, relpath)
            for start in range(0, len(view), step):
                self._write_piece(view[start : start + step])

    def add_file(
        self,
        relpath: str,
        path: str | os.PathLike[str],
        *,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> None:
        """Add the file at ``path`` (symlinks followed), streamed in pieces.

        The size recorded is the opened file's; a file that changes size while it is
        read raises :class:`~dckpt.errors.CheckpointError` and leaves the writer
        unusable. ``callback`` gets ``set_size(bytes)`` and one update per chunk.
        """
        self._check_open()
        relpath = safe_relpath(relpath)
        chunk_bytes = _piece_bytes()
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
                    n = _fill_piece(f, buffer[: min(remaining, len(buffer))])
                    if not n:
                        raise _changed(path, size, "shrank from")
                    self._write_piece(buffer[:n])
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
            self._write_record("symlink", 0o777, len(encoded), relpath, encoded)

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
        """Write the end record; ``out`` stays open."""
        if self._closed:
            return
        self._closed = True
        if self._broken:
            return
        self._write_raw_record(b"Z", 0, self._count, b"", self._chain.digest())
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

    def _write_record(
        self, kind: _Kind, mode: int, size: int, relpath: str, extra: bytes = b""
    ) -> None:
        self._write_raw_record(_CODES[kind], mode & 0o777, size, relpath.encode("utf-8"), extra)

    def _write_raw_record(
        self, code: bytes, mode: int, size: int, path: bytes, extra: bytes
    ) -> None:
        body = _RECORD.pack(code, mode, size, len(path)) + path + extra
        checksum = _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))
        self._chain.update(checksum)
        self._out.write(body + checksum)

    def _write_piece(self, raw: memoryview) -> None:
        header, payload = encode_frame(raw, level=self._level)
        prefix = _PIECE.pack(len(payload)) + header
        self._chain.update(prefix)
        self._out.write(prefix)
        view = bytes_view(payload)
        for start in range(0, len(view), _IO_SLICE):
            self._out.write(view[start : start + _IO_SLICE])


def _fill_piece(f: io.FileIO, view: memoryview) -> int:
    """Read into ``view`` in slices of _IO_SLICE until it is full or the file ends."""
    filled = 0
    while filled < len(view):
        n = f.readinto(view[filled : filled + _IO_SLICE])
        if not n:
            break
        filled += n
    return filled


def _piece_bytes() -> int:
    """``dckpt.formats.write-chunk-bytes``, at least 1 and at most MAX_PIECE_BYTES."""
    value = parse_bytes(dask.config.get("dckpt.formats.write-chunk-bytes"))
    return max(1, min(int(value), MAX_PIECE_BYTES))


def _changed(path: str | os.PathLike[str], size: int, how: str) -> CheckpointError:
    return CheckpointError(
        f"{os.fspath(path)!r} {how} {size} bytes while it was being packed; "
        "pack only files that nobody is writing to"
    )


class _RawRecord(NamedTuple):
    """A record as a body read it: fields as stored, names still bytes."""

    code: bytes
    mode: int
    size: int
    path_len: int
    path: bytes
    target: bytes | None


class ArchiveReader:
    """Read the packed format from a binary stream, one entry at a time.

    Reads every version in :data:`READ_VERSIONS`; :attr:`version` says which one the
    stream holds. Memory stays at a few MiB whatever the entry sizes. After an entry
    is yielded, read its payload with :meth:`read_payload` or :meth:`copy_payload`
    before advancing; an unread payload is skipped (its checksums checked all the
    same). When iteration ends, the reader has checked the entry count, the end of the
    archive and that nothing follows it (reading ``inp`` to its end). Damage of any
    kind raises :class:`~dckpt.errors.CheckpointFormatError` (a piece of a file that
    fails its checksum its subclass :class:`~dckpt.errors.CorruptChunkError`); unsafe
    paths raise its subclass :class:`~dckpt.errors.UnsafePathError`. A reader can be
    iterated once.

    Parameters
    ----------
    inp
        The stream; its header is read and checked at once.

    Attributes
    ----------
    version
        The packed format version of the stream.
    """

    version: int
    _what: str
    _body: _FrameBody | _PieceBody
    _index: EntryIndex
    _entry: ArchiveEntry | None
    _pieces: Iterator[memoryview] | None
    _payload_started: bool
    _started: bool

    def __init__(self, inp: BinaryIO) -> None:
        name = getattr(inp, "name", None)
        self._what = repr(name) if isinstance(name, str) else "the packed data"
        self.version = _check_header(_read_exactly(inp, _HEADER.size), self._what)
        self._body = (_FrameBody if self.version == 1 else _PieceBody)(inp, self._what)
        self._index = EntryIndex()
        self._entry = None
        self._pieces = None
        self._payload_started = False
        self._started = False

    def __iter__(self) -> Iterator[ArchiveEntry]:
        if self._started:
            raise RuntimeError("an ArchiveReader can be iterated only once")
        self._started = True
        count = 0
        while True:
            if self._pieces is not None:  # skip a payload the caller did not read
                for _ in self._pieces:
                    pass
                self._pieces = None
            self._entry = None
            raw = self._body.next_record()
            if raw.code == b"Z":
                self._check_end(raw, count)
                return
            self._entry = self._read_entry(raw)
            if self._entry.kind == "file":
                self._pieces = self._body.pieces(self._entry.size, self._entry.path)
            self._payload_started = False
            count += 1
            yield self._entry

    def read_payload(self) -> bytes:
        """The current file entry's content, whole."""
        out = io.BytesIO()
        self.copy_payload(out)
        return out.getvalue()

    def copy_payload(self, out: BinaryIO, *, callback: Callback = DEFAULT_CALLBACK) -> None:
        """Stream the current file entry's content to ``out``, piece by piece.

        A compressed piece is written once it passed its checksum. A raw piece is
        written in slices of 256 KiB as it is read and its checksum compared at its
        end (cheaper than holding it whole), so a damaged file raises with at most one
        piece of damaged bytes written to ``out``: write to a place you discard on
        error, as :func:`unpack_directory` does (a partial sibling, removed).
        """
        entry = self._entry
        if entry is None or entry.kind != "file":
            raise RuntimeError(f"no file payload to read here (current entry: {entry})")
        if self._payload_started:
            raise RuntimeError(f"the payload of {entry.path!r} was already read")
        self._payload_started = True
        callback.set_size(entry.size)
        assert self._pieces is not None
        for piece in self._pieces:
            out.write(piece)
            callback.relative_update(len(piece))
        self._pieces = None

    def _read_entry(self, raw: _RawRecord) -> ArchiveEntry:
        kind = _KINDS.get(raw.code)
        if kind is None:
            raise _damaged(self._what, f"holds a record of unknown kind {raw.code!r}")
        if kind == "directory" and raw.size:
            raise _damaged(self._what, "holds a directory with a payload")
        path = safe_relpath(self._decode(raw.path, "path"))
        target = self._decode(raw.target, "symlink target") if raw.target is not None else None
        self._index.add(path, kind, target)
        return ArchiveEntry(kind=kind, path=path, mode=raw.mode, size=raw.size, target=target)

    def _check_end(self, raw: _RawRecord, count: int) -> None:
        if raw.mode or raw.path_len:
            raise _damaged(self._what, "has a malformed end record")
        if raw.size != count:
            raise _damaged(
                self._what, f"has an end record counting {raw.size} entries, but {count} were read"
            )
        self._body.finish()

    def _decode(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _damaged(self._what, f"holds a {what} that is not UTF-8 ({raw[:40]!r})") from e


def _check_lengths(what: str, code: bytes, size: int, path_len: int) -> None:
    """Refuse lengths no writer makes before anything is read on their word."""
    if path_len > _MAX_NAME_BYTES or (code == b"L" and size > _MAX_NAME_BYTES):
        raise _damaged(what, "holds an overlong name")


class _PieceBody:
    """Version 2: checksummed records, file contents in raw or lz4 pieces."""

    def __init__(self, inp: BinaryIO, what: str) -> None:
        self._inp = inp
        self._what = what
        self._chain = xxhash.xxh3_64()
        self._buffer = bytearray()

    def next_record(self) -> _RawRecord:
        fixed = self._read(_RECORD.size, "the data ends where a record should begin")
        code, mode, size, path_len = _RECORD.unpack(fixed)
        _check_lengths(self._what, code, size, path_len)
        extra_len = size if code == b"L" else _CHECKSUM.size if code == b"Z" else 0
        rest = self._read(path_len + extra_len + _CHECKSUM.size, "it ends inside a record")
        body = fixed + rest[: -_CHECKSUM.size]
        (stored,) = _CHECKSUM.unpack(rest[-_CHECKSUM.size :])
        actual = xxhash.xxh3_64_intdigest(body)
        if actual != stored:
            raise _corrupted(
                self._what,
                f"a record header fails its checksum ({actual:#018x}, stored {stored:#018x})",
            )
        extra = rest[path_len : path_len + extra_len]
        if code == b"Z" and extra != self._chain.digest():
            raise _corrupted(
                self._what,
                "its end record's digest of all record and piece checksums does not match: "
                "records or pieces are missing, repeated or out of order",
            )
        self._chain.update(rest[-_CHECKSUM.size :])
        return _RawRecord(code, mode, size, path_len, rest[:path_len],
                          extra if code == b"L" else None)

    def pieces(self, size: int, path: str) -> Iterator[memoryview]:
        """The raw bytes of a file of ``size`` bytes, as views into a reused buffer.

        A compressed piece comes whole, once checked; a raw piece in slices, its
        checksum checked after its last slice.
        """
        offset = 0
        while offset < size:
            prefix = self._read(_PIECE_HEADER_SIZE, "it ends inside a file")
            (stored_len,) = _PIECE.unpack_from(prefix)
            flags, raw_len, _ = CHUNK_HEADER.unpack_from(prefix, _PIECE.size)
            if not 0 < raw_len <= min(size - offset, MAX_PIECE_BYTES):
                raise _damaged(
                    self._what,
                    f"holds a piece of {raw_len} bytes at offset {offset} of {path!r}, "
                    f"a file of {size} bytes (pieces hold 1 to {MAX_PIECE_BYTES} bytes)",
                )
            if stored_len > (lz4_bound(raw_len) if flags & FLAG_LZ4 else raw_len):
                raise _damaged(
                    self._what,
                    f"holds a piece of {raw_len} bytes stored in {stored_len} at offset "
                    f"{offset} of {path!r}",
                )
            self._chain.update(prefix)
            what = f"piece at offset {offset} of {path!r}"
            try:
                if flags & FLAG_LZ4 or stored_len != raw_len:
                    yield self._decoded_piece(prefix, stored_len, raw_len, what)
                else:
                    yield from self._raw_piece(prefix, raw_len, what)
            except CorruptChunkError as e:
                raise CorruptChunkError(
                    f"{self._what} is corrupted ({e}); fetch or write it again"
                ) from e
            offset += raw_len

    def _decoded_piece(self, prefix: bytes, stored_len: int, raw_len: int,
                       what: str) -> memoryview:
        """A compressed piece (or a damaged one), read whole and decoded by the codec."""
        if len(self._buffer) < stored_len:  # a new buffer: views of the old stay valid
            self._buffer = bytearray(stored_len)
        payload = memoryview(self._buffer)[:stored_len]
        if _read_into(self._inp, payload) < stored_len:
            raise _truncated(self._what, "it ends inside a file")
        return decode_frame((prefix[_PIECE.size :], payload), raw_len, what=what)

    def _raw_piece(self, prefix: bytes, raw_len: int, what: str) -> Iterator[memoryview]:
        """A raw piece in slices of _IO_SLICE, hashed as they pass, checked at its end."""
        _, _, expected = CHUNK_HEADER.unpack_from(prefix, _PIECE.size)
        hasher = xxhash.xxh3_64()
        if len(self._buffer) < min(raw_len, _IO_SLICE):
            self._buffer = bytearray(min(raw_len, _IO_SLICE))
        left = raw_len
        while left:
            view = memoryview(self._buffer)[: min(left, _IO_SLICE)]
            if _read_into(self._inp, view) < len(view):
                raise _truncated(self._what, "it ends inside a file")
            hasher.update(view)
            left -= len(view)
            yield view
        check_checksum(hasher.intdigest(), expected, what)

    def finish(self) -> None:
        if self._inp.read(1):
            raise _damaged(self._what, "has trailing bytes after the end of the archive")

    def _read(self, n: int, where: str) -> bytes:
        data = _read_exactly(self._inp, n)
        if len(data) < n:
            raise _truncated(self._what, where)
        return data


class _FrameBody:
    """Version 1: records inside one lz4 frame with block and content checksums."""

    def __init__(self, inp: BinaryIO, what: str) -> None:
        self._inp = inp
        self._what = what
        self._decompressor = lz4.frame.LZ4FrameDecompressor()
        self._buffer = b""
        self._pos = 0

    def next_record(self) -> _RawRecord:
        code, mode, size, path_len = _RECORD.unpack(self._take(_RECORD.size))
        if code == b"Z":
            return _RawRecord(code, mode, size, path_len, b"", None)
        _check_lengths(self._what, code, size, path_len)
        path = self._take(path_len)
        target = self._take(size) if code == b"L" else None
        return _RawRecord(code, mode, size, path_len, path, target)

    def pieces(self, size: int, path: str) -> Iterator[memoryview]:
        remaining = size
        while remaining:
            chunk = self._take_some(remaining)
            remaining -= len(chunk)
            yield memoryview(chunk)

    def finish(self) -> None:
        if self._pos < len(self._buffer) or self._fill():
            raise _damaged(self._what, "holds data after its end record")
        if self._decompressor.unused_data or self._inp.read(1):
            raise _damaged(self._what, "has trailing bytes after the end of the archive")

    def _take(self, n: int) -> bytes:
        """Exactly ``n`` decompressed bytes (``n`` is small: a record header or a name)."""
        while len(self._buffer) - self._pos < n:
            if not self._fill():
                raise _truncated(self._what, "its compressed body ends inside a record")
        data = self._buffer[self._pos : self._pos + n]
        self._pos += n
        return data

    def _take_some(self, limit: int) -> bytes:
        """Between 1 and ``limit`` decompressed bytes."""
        if self._pos == len(self._buffer) and not self._fill():
            raise _truncated(self._what, "its compressed body ends inside a file")
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
                    raise _truncated(self._what, "the data ends before the archive does")
            else:
                raw = b""
            try:
                out = decompressor.decompress(raw, max_length=_OUTPUT_CHUNK)
            except RuntimeError as e:  # how python-lz4 reports bad checksums and headers
                raise _corrupted(self._what, str(e)) from e
            if out:
                self._buffer = self._buffer[self._pos :] + out
                self._pos = 0
                return True
        return False


def _damaged(what: str, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{what} {problem}: it is damaged, or not written by this version of dckpt"
    )


def _corrupted(what: str, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{what} is corrupted ({problem}); fetch or write it again")


def _truncated(what: str, where: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{what} is truncated: {where}; fetch or write it again")


def _read_exactly(inp: BinaryIO, n: int) -> bytes:
    data = inp.read(n)
    while len(data) < n:
        more = inp.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _read_into(inp: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``inp`` as far as it goes; the number of bytes read."""
    readinto = getattr(inp, "readinto", None)
    filled = 0
    while filled < len(view):
        if readinto is not None:
            n = readinto(view[filled:])
        else:
            more = inp.read(len(view) - filled)
            n = len(more)
            view[filled : filled + n] = more
        if not n:
            break
        filled += n
    return filled


def _check_header(header: bytes, what: str) -> int:
    """The version of a checked header."""
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
    if version not in READ_VERSIONS:
        known = " and ".join(str(v) for v in READ_VERSIONS)
        raise CheckpointFormatError(
            f"{what} uses packed format version {version}, but this dckpt reads versions "
            f"{known} only; read it with the dckpt version that wrote it"
        )
    if flags & ~_KNOWN_FLAGS:
        raise CheckpointFormatError(
            f"{what} sets unknown format flags {flags:#06x} (this dckpt knows "
            f"{_KNOWN_FLAGS:#06x}); was it written by a newer dckpt?"
        )
    return int(version)


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
    with atomic_file(path) as out:
        pack_directory(root, cast(BinaryIO, out), exclude=exclude, callback=callback)


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
