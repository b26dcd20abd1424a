"""Chunk frames as the transfer sends them: the codec of :mod:`dckpt._formats`, with
the transfer's settings and links.

The frame layout, the checksum (xxh3_64 of the raw bytes) and the sample rule live in
one place, :mod:`dckpt._formats._frames`, shared with the packed byte format; see
there. This module adds what only a transfer knows: the ``dckpt.transfer.compression``
setting (``"auto"``, ``"lz4"``, ``"none"``), the link a chunk crosses
(:func:`max_ratio_for_link`: on a fast link nothing pays, on 1 Gbit/s halving the
bytes does) and the :class:`~dckpt._transfer.ChunkSpec` a frame must match. Its names
(``CHUNK_HEADER``, ``Buffer``, ``Frame``, ``compress_speed``, ``encode_chunk``,
``encode_parts``, ``decode_chunk``, ``max_ratio_for_link``) stay importable from here.
"""

from __future__ import annotations

import xxhash

from dckpt._formats import (
    CHUNK_HEADER,
    MIN_RATIO,
    Buffer,
    Frame,
    compress_speed,
    decode_frame,
    encode_frame,
    frame_checksum,
)
from dckpt._transfer._manifest import ChunkSpec
from dckpt._transfer._settings import compression

__all__ = [
    "CHUNK_HEADER", "Buffer", "Frame", "compress_speed", "decode_chunk", "describe_chunk",
    "encode_chunk", "encode_parts", "frame_checksum", "max_ratio_for_link", "never_compresses",
    "raw_checksum", "raw_header",
]


def max_ratio_for_link(link_bytes_per_second: float) -> float:
    """The largest compression ratio at which compressing pays on this link.

    A chunk of ``L`` bytes that compresses to ``r·L`` costs ``L/c + r·L/link + L/d``
    compressed (``c``, ``d``: lz4's compression and decompression speeds, the latter
    taken as twice the former) against ``L/link`` raw, so compressing pays when
    ``r < 1 - link·(1/c + 1/d)``. Capped at 90% (below which a sample must shrink at
    all); 0 (never) when the link outruns lz4.
    """
    speed = compress_speed()
    limit = 1.0 - link_bytes_per_second * (1.0 / speed + 1.0 / (2.0 * speed))
    return max(0.0, min(MIN_RATIO, limit))


def never_compresses(max_ratio: float | None) -> bool:
    """Whether :func:`encode_parts` with this ``max_ratio`` sends every chunk raw:
    ``dckpt.transfer.compression`` is ``"none"``, or ``"auto"`` with ``max_ratio`` 0.

    A sender that knows this can send a chunk straight from its file
    (:meth:`~dckpt._transfer.ChunkSource.read_region`) instead of through a buffer.
    """
    mode = compression()
    return mode == "none" or (mode == "auto" and max_ratio is not None and max_ratio <= 0)


def raw_checksum() -> xxhash.xxh3_64:
    """A fresh checksum of a frame's raw bytes, to be fed in pieces (``update``):
    xxh3_64, as :func:`dckpt._formats.encode_frame` computes it in one go."""
    return xxhash.xxh3_64()


def raw_header(length: int, checksum: int) -> bytes:
    """The header of an uncompressed frame of ``length`` bytes whose
    :func:`raw_checksum` is ``checksum`` (its ``intdigest()``)."""
    return CHUNK_HEADER.pack(0, length, checksum)


def encode_chunk(raw: Buffer, *, compress: bool | None = None) -> bytes:
    """One chunk frame as one buffer: :func:`encode_parts` joined (one copy)."""
    return b"".join(encode_parts(raw, compress=compress))


def encode_parts(
    raw: Buffer, *, compress: bool | None = None, max_ratio: float | None = None
) -> tuple[bytes, Buffer]:
    """One chunk frame as ``(header, payload)``.

    An uncompressed payload is a view of ``raw``, not a copy: it must stay unchanged
    until the frame is sent.

    Parameters
    ----------
    raw
        The chunk's bytes.
    compress
        ``True`` or ``False`` forces lz4 on or off. ``None`` follows
        ``dckpt.transfer.compression``: ``"lz4"``, ``"none"``, or ``"auto"``, which
        compresses when a 64 KiB sample from the middle of the chunk shrinks below
        ``max_ratio`` (default 90%; a sender that knows the link passes
        :func:`max_ratio_for_link`) and the whole chunk then shrinks at all.
    max_ratio
        For ``"auto"``: the sample ratio below which to compress; 0 never does.
    """
    if compress is None:
        mode = compression()
        if mode != "auto":
            compress = mode == "lz4"
    return encode_frame(raw, compress=compress, timed=True,
                        max_ratio=MIN_RATIO if max_ratio is None else max_ratio)


def decode_chunk(
    frame: Frame,
    spec: ChunkSpec,
    out: memoryview | bytearray | None = None,
) -> memoryview:
    """The raw bytes of a chunk frame, checked against ``spec`` and its checksum.

    Parameters
    ----------
    frame
        What :func:`encode_chunk` or :func:`encode_parts` returned for the chunk
        ``spec``.
    spec
        The chunk that was asked for: its length must match the frame's.
    out
        Where to put the bytes; at least ``spec.length`` long. Without it, the result
        is a view into ``frame`` (uncompressed) or into a new ``bytes``.

    Raises
    ------
    CorruptChunkError
        A truncated frame, unknown flags, a length other than ``spec.length``, an lz4
        block that does not decompress to it, or a checksum mismatch.
    """
    return decode_frame(frame, spec.length, out, what=describe_chunk(spec))


def describe_chunk(spec: ChunkSpec) -> str:
    """How errors name the chunk ``spec``."""
    return f"chunk of file #{spec.file_index} at offset {spec.offset} ({spec.length} bytes)"
