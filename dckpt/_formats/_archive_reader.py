"""The reader of the packed format (:mod:`dckpt._formats._packing` defines it).

:class:`ArchiveReader` yields the entries of a stream of any version it reads, checked
as they pass: version 2 through :class:`_PieceBody` here, version 1 through
:class:`~dckpt._formats._archive_v1.FrameBody`. :func:`unpack_to_directory` and
:func:`unpack_directory` write what it yields into a directory, nothing outside it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import BinaryIO

import xxhash
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt._formats._archive_v1 import FrameBody
from dckpt._formats._atomic import atomic_directory
from dckpt._formats._frames import (
    CHUNK_HEADER,
    FLAG_LZ4,
    check_checksum,
    decode_frame,
    lz4_bound,
)
from dckpt._formats._packing import (
    CHECKSUM,
    HEADER,
    IO_SLICE,
    KINDS,
    MAX_PIECE_BYTES,
    PIECE,
    PIECE_HEADER_SIZE,
    RECORD,
    ArchiveEntry,
    RawRecord,
    check_header,
    check_lengths,
    corrupted,
    damaged,
    read_exactly,
    read_into,
    truncated,
)
from dckpt._formats._paths import EntryIndex, safe_relpath
from dckpt.errors import CorruptChunkError


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
    _body: FrameBody | _PieceBody
    _index: EntryIndex
    _entry: ArchiveEntry | None
    _pieces: Iterator[memoryview] | None
    _payload_started: bool
    _started: bool

    def __init__(self, inp: BinaryIO) -> None:
        name = getattr(inp, "name", None)
        self._what = repr(name) if isinstance(name, str) else "the packed data"
        self.version = check_header(read_exactly(inp, HEADER.size), self._what)
        self._body = (FrameBody if self.version == 1 else _PieceBody)(inp, self._what)
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

    def _read_entry(self, raw: RawRecord) -> ArchiveEntry:
        kind = KINDS.get(raw.code)
        if kind is None:
            raise damaged(self._what, f"holds a record of unknown kind {raw.code!r}")
        if kind == "directory" and raw.size:
            raise damaged(self._what, "holds a directory with a payload")
        path = safe_relpath(self._decode(raw.path, "path"))
        target = self._decode(raw.target, "symlink target") if raw.target is not None else None
        self._index.add(path, kind, target)
        return ArchiveEntry(kind=kind, path=path, mode=raw.mode, size=raw.size, target=target)

    def _check_end(self, raw: RawRecord, count: int) -> None:
        if raw.mode or raw.path_len:
            raise damaged(self._what, "has a malformed end record")
        if raw.size != count:
            raise damaged(
                self._what, f"has an end record counting {raw.size} entries, but {count} were read"
            )
        self._body.finish()

    def _decode(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise damaged(self._what, f"holds a {what} that is not UTF-8 ({raw[:40]!r})") from e


class _PieceBody:
    """Version 2: checksummed records, file contents in raw or lz4 pieces."""

    def __init__(self, inp: BinaryIO, what: str) -> None:
        self._inp = inp
        self._what = what
        self._chain = xxhash.xxh3_64()
        self._buffer = bytearray()

    def next_record(self) -> RawRecord:
        fixed = self._read(RECORD.size, "the data ends where a record should begin")
        code, mode, size, path_len = RECORD.unpack(fixed)
        check_lengths(self._what, code, size, path_len)
        extra_len = size if code == b"L" else CHECKSUM.size if code == b"Z" else 0
        rest = self._read(path_len + extra_len + CHECKSUM.size, "it ends inside a record")
        body = fixed + rest[: -CHECKSUM.size]
        (stored,) = CHECKSUM.unpack(rest[-CHECKSUM.size :])
        actual = xxhash.xxh3_64_intdigest(body)
        if actual != stored:
            raise corrupted(
                self._what,
                f"a record header fails its checksum ({actual:#018x}, stored {stored:#018x})",
            )
        extra = rest[path_len : path_len + extra_len]
        if code == b"Z" and extra != self._chain.digest():
            raise corrupted(
                self._what,
                "its end record's digest of all record and piece checksums does not match: "
                "records or pieces are missing, repeated or out of order",
            )
        self._chain.update(rest[-CHECKSUM.size :])
        return RawRecord(code, mode, size, path_len, rest[:path_len],
                          extra if code == b"L" else None)

    def pieces(self, size: int, path: str) -> Iterator[memoryview]:
        """The raw bytes of a file of ``size`` bytes, as views into a reused buffer.

        A compressed piece comes whole, once checked; a raw piece in slices, its
        checksum checked after its last slice.
        """
        offset = 0
        while offset < size:
            prefix = self._read(PIECE_HEADER_SIZE, "it ends inside a file")
            (stored_len,) = PIECE.unpack_from(prefix)
            flags, raw_len, _ = CHUNK_HEADER.unpack_from(prefix, PIECE.size)
            if not 0 < raw_len <= min(size - offset, MAX_PIECE_BYTES):
                raise damaged(
                    self._what,
                    f"holds a piece of {raw_len} bytes at offset {offset} of {path!r}, "
                    f"a file of {size} bytes (pieces hold 1 to {MAX_PIECE_BYTES} bytes)",
                )
            if stored_len > (lz4_bound(raw_len) if flags & FLAG_LZ4 else raw_len):
                raise damaged(
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
        if read_into(self._inp, payload) < stored_len:
            raise truncated(self._what, "it ends inside a file")
        return decode_frame((prefix[PIECE.size :], payload), raw_len, what=what)

    def _raw_piece(self, prefix: bytes, raw_len: int, what: str) -> Iterator[memoryview]:
        """A raw piece in slices of IO_SLICE, hashed as they pass, checked at its end."""
        _, _, expected = CHUNK_HEADER.unpack_from(prefix, PIECE.size)
        hasher = xxhash.xxh3_64()
        if len(self._buffer) < min(raw_len, IO_SLICE):
            self._buffer = bytearray(min(raw_len, IO_SLICE))
        left = raw_len
        while left:
            view = memoryview(self._buffer)[: min(left, IO_SLICE)]
            if read_into(self._inp, view) < len(view):
                raise truncated(self._what, "it ends inside a file")
            hasher.update(view)
            left -= len(view)
            yield view
        check_checksum(hasher.intdigest(), expected, what)

    def finish(self) -> None:
        if self._inp.read(1):
            raise damaged(self._what, "has trailing bytes after the end of the archive")

    def _read(self, n: int, where: str) -> bytes:
        data = read_exactly(self._inp, n)
        if len(data) < n:
            raise truncated(self._what, where)
        return data


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
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with open(fd, "wb") as f, callback.branched(entry.path, dest) as child:
            reader.copy_payload(f, callback=child)
            os.fchmod(f.fileno(), entry.mode & 0o777)
        callback.relative_update(1)
    for entry in links:
        assert entry.target is not None
        dest = os.path.join(target, *entry.path.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(entry.target, dest)
