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

The format is defined here: its constants, the entry a reader yields, the header and
length checks and the errors every reader raises. The writer is
:mod:`dckpt._formats._archive_writer` (:class:`ArchiveWriter`, :func:`pack_directory`),
the reader :mod:`dckpt._formats._archive_reader` (:class:`ArchiveReader`,
:func:`unpack_to_directory`), which reads version 1 through
:mod:`dckpt._formats._archive_v1`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from dckpt._formats._frames import CHUNK_HEADER
from dckpt._formats._paths import EntryKind
from dckpt.errors import CheckpointFormatError

MAGIC = b"\x89DCKPT\r\n"
FORMAT_VERSION = 2
"""The version writers write."""
READ_VERSIONS = (1, 2)
"""The versions readers read."""
MAX_PIECE_BYTES = 64 << 20
"""The largest piece of a file a writer makes and a reader accepts."""

HEADER = struct.Struct(">8sHH")
RECORD = struct.Struct(">cIQI")
CHECKSUM = struct.Struct(">Q")
PIECE = struct.Struct(">I")  # stored_len, before the chunk frame's header
PIECE_HEADER_SIZE = PIECE.size + CHUNK_HEADER.size
_KNOWN_FLAGS = 0
KINDS: dict[bytes, EntryKind] = {b"F": "file", b"D": "directory", b"L": "symlink"}
CODES = {kind: code for code, kind in KINDS.items()}
# Longer names or link targets than any filesystem allows mean a damaged record; the
# cap keeps a hostile length from making us buffer gigabytes.
_MAX_NAME_BYTES = 64 * 1024
# Files and raw pieces are read and written in slices of this size (a reader hashes
# them as they pass): copies that stay in the CPU's cache cost about half the CPU of
# 4 MiB ones here when unpacking, and far less erratically when packing too (A/B on
# this project's machine, 1 GiB; see the commits that brought it in).
IO_SLICE = 256 << 10


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

    kind: EntryKind
    path: str
    mode: int
    size: int
    target: str | None = None


class RawRecord(NamedTuple):
    """A record as a body read it: fields as stored, names still bytes."""

    code: bytes
    mode: int
    size: int
    path_len: int
    path: bytes
    target: bytes | None


def check_lengths(what: str, code: bytes, size: int, path_len: int) -> None:
    """Refuse lengths no writer makes before anything is read on their word."""
    if path_len > _MAX_NAME_BYTES or (code == b"L" and size > _MAX_NAME_BYTES):
        raise damaged(what, "holds an overlong name")


def damaged(what: str, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{what} {problem}: it is damaged, or not written by this version of dckpt"
    )


def corrupted(what: str, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{what} is corrupted ({problem}); fetch or write it again")


def truncated(what: str, where: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{what} is truncated: {where}; fetch or write it again")


def read_exactly(inp: BinaryIO, n: int) -> bytes:
    data = inp.read(n)
    while len(data) < n:
        more = inp.read(n - len(data))
        if not more:
            break
        data += more
    return data


def read_into(inp: BinaryIO, view: memoryview) -> int:
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


def check_header(header: bytes, what: str) -> int:
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
    if len(header) < HEADER.size:
        raise CheckpointFormatError(f"{what} is truncated: it ends inside the dckpt header")
    _, version, flags = HEADER.unpack(header)
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
