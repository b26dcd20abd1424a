"""Chunk frames: one piece of a file, maybe lz4-compressed, with a checksum.

The one codec of dckpt's bytes: the transfer sends each chunk as a frame
(:mod:`dckpt._transfer`), and the packed format stores each piece of a file as one
(:mod:`dckpt._formats._packing`). A frame is :data:`CHUNK_HEADER` followed by its
payload::

    header  17 bytes, big-endian: flags: uint8 (bit 0: lz4-compressed),
            raw length: uint64, xxh3_64 of the raw bytes: uint64
    payload the raw bytes, or one lz4 block (no size prefix) that decompresses to them

It may travel as one buffer or as the pair ``(header, payload)``
(:func:`encode_frame`), which spares copying an uncompressed piece behind its header.

Compression is decided per piece: lz4 costs ~1.4 s per GiB and gains nothing on model
weights, so only pieces whose 64 KiB sample (from the middle of the piece) shrinks
below ``max_ratio`` of its size (:data:`MIN_RATIO`, 90%, unless the caller knows
better, e.g. the link a chunk crosses) are compressed, and then only if the whole
piece shrinks at all. :func:`compress_speed` is lz4's speed here, measured on the
pieces it compressed. The checksum covers the raw bytes, so it checks decompression
too. It is xxh3_64 (the ``xxhash`` package) rather than zlib's crc32: 29 GB/s against
2.2 here, and every byte passes through it at both ends.
"""

from __future__ import annotations

import struct
import time
from typing import TypeAlias

import lz4.block
import xxhash

from dckpt.errors import CorruptChunkError

__all__ = [
    "CHUNK_HEADER", "MIN_RATIO", "Buffer", "Frame", "check_checksum",
    "compress_speed", "decode_frame", "encode_frame", "frame_checksum", "lz4_bound",
    "raw_header_checksum",
]

CHUNK_HEADER = struct.Struct(">BQQ")
"""Header of every chunk frame: flags, raw length, xxh3_64 of the raw bytes."""

Buffer: TypeAlias = bytes | bytearray | memoryview


Frame: TypeAlias = Buffer | tuple[Buffer, Buffer]
"""A frame as one buffer, or as ``(header, payload)``."""

FLAG_LZ4 = 0x01
_KNOWN_FLAGS = FLAG_LZ4
# The compression decision looks at this much of a piece: lz4 compresses 64 KiB in
# ~20 µs here, against ~5 ms for a whole 8 MiB piece of incompressible data.
_SAMPLE_BYTES = 64 * 1024
MIN_RATIO = 0.9
"""Compress a piece only if its sample shrinks below this fraction of its size.

lz4 costs ~1.4 s per GiB to compress and ~0.7 s to decompress here, so a smaller
saving does not pay against a ~1.6 GB/s disk or link.
tests/test_transfer.py::test_half_compressible_chunk_goes_by_its_sample pins where
the sample is taken."""
# lz4's speed before any piece was timed (bytes/s, from the costs above).
_COMPRESS_PRIOR = 0.77e9
_TIMED_MIN_BYTES = 1 << 20  # smaller compressions say more about overheads than speed
_compress_speed = _COMPRESS_PRIOR
# lz4 levels below this are its fast mode; from here on its high-compression mode,
# as lz4.frame counts them.
_HC_LEVEL = 3


def compress_speed() -> float:
    """lz4's compression speed in this process, in bytes per second: a running average
    over the transfer's chunks of at least 1 MiB it compressed (a prior until the
    first); see ``timed`` in :func:`encode_frame`."""
    return _compress_speed


def lz4_bound(length: int) -> int:
    """The most bytes an lz4 block of ``length`` raw bytes can take (LZ4_compressBound)."""
    return length + length // 255 + 16


def encode_frame(
    raw: Buffer,
    *,
    compress: bool | None = None,
    max_ratio: float = MIN_RATIO,
    level: int = 0,
    timed: bool = False,
) -> tuple[bytes, Buffer]:
    """One chunk frame as ``(header, payload)``.

    An uncompressed payload is a view of ``raw``, not a copy: it must stay unchanged
    until the frame is written or sent.

    Parameters
    ----------
    raw
        The piece's bytes.
    compress
        ``True`` or ``False`` forces lz4 on or off; ``None`` compresses when a 64 KiB
        sample from the middle of the piece shrinks below ``max_ratio`` and the whole
        piece then shrinks at all.
    max_ratio
        For ``compress=None``: the sample ratio below which to compress; 0 never does.
    level
        lz4 level as ``lz4.frame`` counts them: below 3 the fast mode, 3-16 the
        high-compression mode at that level.
    timed
        Whether the compression (at a level below 3, of at least 1 MiB) counts into
        :func:`compress_speed`. The transfer times its chunks, since it decides from
        that speed; packing does not, so that what a process packs does not sway
        the transfer's decisions.
    """
    view = bytes_view(raw)
    checksum = xxhash.xxh3_64_intdigest(view)
    payload: Buffer = view
    if compress is None:
        compress = max_ratio > 0 and _sample_compresses(view, max_ratio)
        if compress:
            payload = _compressed(view, level, timed)
            if len(payload) >= len(view):  # the sample misled us: store it raw
                payload, compress = view, False
    elif compress:
        payload = _compressed(view, level, timed)
    flags = FLAG_LZ4 if compress else 0
    return CHUNK_HEADER.pack(flags, len(view), checksum), payload


def _sample_compresses(view: memoryview, limit: float) -> bool:
    start = max(0, (len(view) - _SAMPLE_BYTES) // 2)
    sample = view[start : start + _SAMPLE_BYTES]
    return len(lz4.block.compress(sample, store_size=False)) < limit * len(sample)


def _compressed(view: memoryview, level: int, timed: bool) -> bytes:
    """lz4 of ``view``; if ``timed``, at the fast level, timed into :func:`compress_speed`."""
    global _compress_speed
    if level >= _HC_LEVEL:
        hc: bytes = lz4.block.compress(
            view, mode="high_compression", compression=level, store_size=False
        )
        return hc
    started = time.perf_counter()
    payload: bytes = lz4.block.compress(view, store_size=False)
    elapsed = time.perf_counter() - started
    if timed and len(view) >= _TIMED_MIN_BYTES and elapsed > 0:
        # A running average; races between threads only blur it.
        _compress_speed = 0.7 * _compress_speed + 0.3 * (len(view) / elapsed)
    return payload


def decode_frame(
    frame: Frame,
    length: int,
    out: memoryview | bytearray | None = None,
    *,
    what: str = "chunk",
) -> memoryview:
    """The raw bytes of a chunk frame, checked against ``length`` and its checksum.

    Parameters
    ----------
    frame
        What :func:`encode_frame` returned, as a pair or joined.
    length
        The raw length the caller expects: the frame's must match.
    out
        Where to put the bytes; at least ``length`` long. Without it, the result is a
        view into ``frame`` (uncompressed) or into a new ``bytes``.
    what
        Names the piece in error messages (``"corrupt <what>: <problem>"``).

    Raises
    ------
    CorruptChunkError
        A truncated frame, unknown flags, a length other than ``length``, an lz4 block
        that does not decompress to it, or a checksum mismatch.
    """
    if isinstance(frame, tuple):
        header, payload = bytes_view(frame[0]), bytes_view(frame[1])
    else:
        view = bytes_view(frame)
        header, payload = view[: CHUNK_HEADER.size], view[CHUNK_HEADER.size :]
    if len(header) != CHUNK_HEADER.size:
        raise _corrupt(what, f"its header is {len(header)} bytes, not {CHUNK_HEADER.size}")
    flags, frame_length, checksum = CHUNK_HEADER.unpack(header)
    if flags & ~_KNOWN_FLAGS:
        raise _corrupt(what, f"unknown flags {flags:#04x}")
    # Checked before decompressing: the header's length sizes the output buffer.
    if frame_length != length:
        raise _corrupt(what, f"the frame holds {frame_length} bytes, not {length}")
    data: memoryview
    if flags & FLAG_LZ4:
        try:
            data = memoryview(lz4.block.decompress(payload, uncompressed_size=length))
        except lz4.block.LZ4BlockError as e:
            raise _corrupt(what, f"its lz4 block does not decompress ({e})") from e
        if len(data) != length:
            raise _corrupt(what, f"its lz4 block decompresses to {len(data)} bytes, not {length}")
    else:
        if len(payload) != length:
            raise _corrupt(what, f"its payload is {len(payload)} bytes, not {length}")
        data = payload
    check_checksum(xxhash.xxh3_64_intdigest(data), checksum, what)
    if out is None:
        return data
    target = memoryview(out)
    if len(target) < length:
        raise ValueError(f"out holds {len(target)} bytes, the chunk {length}")
    target[:length] = data
    return target[:length]


def raw_header_checksum(header: Buffer, length: int, *, what: str = "chunk") -> int:
    """The checksum that the header of an uncompressed frame of ``length`` raw bytes
    gives, for a receiver that checks the payload as it streams in rather than through
    :func:`decode_frame`.

    Raises
    ------
    CorruptChunkError
        A header of another size, with unknown flags, of a compressed frame, or of a
        frame of another length.
    """
    view = bytes_view(header)
    if len(view) != CHUNK_HEADER.size:
        raise _corrupt(what, f"its header is {len(view)} bytes, not {CHUNK_HEADER.size}")
    flags, frame_length, checksum = CHUNK_HEADER.unpack(view)
    if flags & ~_KNOWN_FLAGS:
        raise _corrupt(what, f"unknown flags {flags:#04x}")
    if flags & FLAG_LZ4:
        raise _corrupt(what, "its header says lz4, but its payload is as long as its bytes")
    if frame_length != length:
        raise _corrupt(what, f"the frame holds {frame_length} bytes, not {length}")
    return int(checksum)


def frame_checksum(frame: Frame) -> int:
    """The checksum a frame's header gives, the xxh3_64 of its raw bytes: those of a
    frame :func:`decode_frame` accepted hash to it."""
    header = bytes_view(frame[0]) if isinstance(frame, tuple) else bytes_view(frame)
    return int(CHUNK_HEADER.unpack(header[: CHUNK_HEADER.size])[2])


def check_checksum(actual: int, expected: int, what: str = "chunk") -> None:
    """Raise the :class:`CorruptChunkError` of a frame whose raw bytes hash to ``actual``
    (xxh3_64) where its header says ``expected``; for callers that hash a raw payload
    as it streams instead of calling :func:`decode_frame`."""
    if actual != expected:
        raise _corrupt(what, f"checksum {actual:#018x} of its bytes, header says {expected:#018x}")


def _corrupt(what: str, problem: str) -> CorruptChunkError:
    return CorruptChunkError(f"corrupt {what}: {problem}")


def bytes_view(buffer: Buffer) -> memoryview:
    """``buffer`` as a flat memoryview of bytes (no copy)."""
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view
