"""How checkpoints look on disk and on the wire.

The packed byte format (:mod:`dckpt.formats._packing`) and the chunk frame codec it
shares with the transfer (:mod:`dckpt.formats._frames`) are public here; the directory
layout (:mod:`dckpt.formats._layout`), path checks and atomic renames are private
helpers used by the rest of dckpt.
"""

from __future__ import annotations

from dckpt.formats._frames import (
    CHUNK_HEADER,
    MIN_RATIO,
    Buffer,
    Frame,
    compress_speed,
    decode_frame,
    encode_frame,
)
from dckpt.formats._packing import (
    FORMAT_VERSION,
    MAGIC,
    ArchiveEntry,
    ArchiveReader,
    ArchiveWriter,
    is_packed,
    pack_directory,
    pack_directory_to_bytes,
    pack_directory_to_file,
    unpack_directory,
    unpack_to_directory,
)

__all__ = [
    "CHUNK_HEADER",
    "MIN_RATIO",
    "Buffer",
    "Frame",
    "compress_speed",
    "decode_frame",
    "encode_frame",
    "FORMAT_VERSION",
    "MAGIC",
    "ArchiveEntry",
    "ArchiveReader",
    "ArchiveWriter",
    "is_packed",
    "pack_directory",
    "pack_directory_to_bytes",
    "pack_directory_to_file",
    "unpack_directory",
    "unpack_to_directory",
]
