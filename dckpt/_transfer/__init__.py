"""Copy a directory from one process to another as a manifest followed by chunks.

Everything of a node-to-node transfer except Dask, so that it can be tested with plain
function calls. The receiver gets a :class:`Manifest` (what files, folders and
symlinks the directory holds), cuts the files into :class:`ChunkSpec`\\ s and asks a
stream for them; the sender answers each with one frame (:mod:`._frames`: a 17-byte
header with flags, length and checksum, then the raw or lz4-compressed bytes).

- sender: :class:`ChunkSource`, thread-safe, reading with ``os.preadv``, or handing out
  a :class:`FileRegion` for ``os.sendfile`` (:meth:`ChunkSource.read_region`);
- receiver: :func:`receive_directory`, a coroutine that takes frames from a
  :data:`ChunkStream` and hands the CPU and disk work of each (decode, checksum,
  ``os.pwrite``) to a thread, a bounded number at a time.

Memory on either side grows by a few chunks, never by the size of the checkpoint.
A receiver that holds some of the files already (``have``) asks only for the chunks of
the others, and places those from its own copies (hard links where it can).

Modules: ``_manifest`` (the manifest and its checks), ``_frames`` (chunk frames: the
codec of :mod:`dckpt._formats` with the transfer's compression setting and link rule),
``_source`` (the sender), ``_receive`` (the receiver), ``_place`` (files placed from
local copies), ``_progress`` (receives in progress: :func:`receiving`, and their INFO
log lines), ``_settings``
(``dckpt.transfer.chunk-bytes``, ``max-in-flight``, ``compression``, ``retries``).
"""

from __future__ import annotations

from dckpt._transfer._frames import (
    CHUNK_HEADER,
    Buffer,
    Frame,
    decode_chunk,
    encode_chunk,
    encode_parts,
    max_ratio_for_link,
    never_compresses,
    raw_checksum,
)
from dckpt._transfer._chunk_writer import ChunkWriter, Written
from dckpt._transfer._manifest import (
    ChunkSpec,
    FileEntry,
    Manifest,
    build_manifest,
    content_digest,
)
from dckpt._transfer._place import Have
from dckpt._transfer._progress import ReceiveProgress, receiving
from dckpt._transfer._receive import ChunkStream, Received, WritingStream, receive_directory
from dckpt._transfer._settings import check_chunk_bytes, config_chunk_bytes
from dckpt._transfer._source import ChunkSource, FileRegion

__all__ = [
    "CHUNK_HEADER",
    "Buffer",
    "ChunkSource",
    "ChunkSpec",
    "ChunkStream",
    "ChunkWriter",
    "FileEntry",
    "FileRegion",
    "Frame",
    "Have",
    "Manifest",
    "ReceiveProgress",
    "Received",
    "Written",
    "WritingStream",
    "build_manifest",
    "content_digest",
    "check_chunk_bytes",
    "config_chunk_bytes",
    "decode_chunk",
    "encode_chunk",
    "encode_parts",
    "max_ratio_for_link",
    "never_compresses",
    "raw_checksum",
    "receive_directory",
    "receiving",
]
