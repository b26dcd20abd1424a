"""How checkpoints look on disk and on the wire: dckpt's building blocks, not a user's API.

The packed byte format (:mod:`dckpt._formats._packing`) and the chunk frame codec it
shares with the transfer (:mod:`dckpt._formats._frames`) are exported here, as are the
few helpers the layers above share (``DESIGN.md``: what two layers share is public in
the lower one): path checks (:func:`safe_relpath`, :class:`EntryIndex`), the walk of a
tree (:func:`plan_tree`, :func:`copy_tree`), atomic writes (:func:`atomic_directory`,
:func:`partial_sibling`, :func:`atomic_file`, :func:`write_file_atomically`) and bounded
JSON reading (:func:`load_json`). Two modules of many names are imported as modules,
not through this one: :mod:`~dckpt._formats.layout` (the directory layout of the
``Checkpoint`` façade, which ``dckpt inspect`` reads too) and
:mod:`~dckpt._formats.ray_format` (what Ray AIR wrote).
"""

from __future__ import annotations

from dckpt._formats._archive_reader import (
    ArchiveReader,
    unpack_directory,
    unpack_to_directory,
)
from dckpt._formats._archive_writer import (
    ArchiveWriter,
    pack_directory,
    pack_directory_to_bytes,
    pack_directory_to_file,
)
from dckpt._formats._atomic import (
    atomic_directory,
    atomic_file,
    partial_sibling,
    write_file_atomically,
)
from dckpt._formats._frames import (
    CHUNK_HEADER,
    MIN_RATIO,
    Buffer,
    Frame,
    check_checksum,
    compress_speed,
    decode_frame,
    encode_frame,
    frame_checksum,
    raw_header_checksum,
)
from dckpt._formats._packing import FORMAT_VERSION, MAGIC, ArchiveEntry, is_packed
from dckpt._formats._paths import EntryIndex, safe_relpath
from dckpt._formats._tree import copy_tree, plan_tree
from dckpt._formats.layout import load_json

__all__ = [
    "CHUNK_HEADER",
    "MIN_RATIO",
    "Buffer",
    "Frame",
    "check_checksum",
    "compress_speed",
    "decode_frame",
    "encode_frame",
    "frame_checksum",
    "raw_header_checksum",
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
    # shared with the layers above
    "EntryIndex",
    "atomic_directory",
    "atomic_file",
    "copy_tree",
    "load_json",
    "partial_sibling",
    "plan_tree",
    "safe_relpath",
    "write_file_atomically",
]
