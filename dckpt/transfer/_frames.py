"""Chunk frames: one chunk of a file, maybe lz4-compressed, with a checksum.

A frame is :data:`CHUNK_HEADER` followed by its payload::

    header  17 bytes, big-endian: flags: uint8 (bit 0: lz4-compressed),
            raw length: uint64, xxh3_64 of the raw bytes: uint64
    payload the raw bytes, or one lz4 block (no size prefix) that decompresses to them

It may travel as one buffer or as the pair ``(header, payload)``
(:func:`encode_parts`), which spares copying an uncompressed chunk behind its header.

Compression is decided per chunk: lz4 costs ~1.4 s per GiB and gains nothing on model
weights, so only chunks whose 64 KiB sample shrinks are compressed — below 90% of its
size, or below the ratio at which it pays on the link the chunk crosses
(:func:`max_ratio_for_link`: on a fast link nothing pays, on 1 Gbit/s halving the bytes
does). :func:`compress_speed` is lz4's speed here, measured on the chunks it
compressed. The checksum
covers the raw bytes, so it checks decompression too. It is xxh3_64 (the ``xxhash``
package) rather than zlib's crc32: 29 GB/s against 2.2 here, and both ends of a
transfer pass every byte through it, on machines where sender and receiver share
the CPU with the copy itself.
"""

from __future__ import annotations

import struct
import time
from typing import TypeAlias

import lz4.block
import xxhash

from dckpt.errors import CorruptChunkError
from dckpt.transfer._manifest import ChunkSpec
from dckpt.transfer._settings import compression

__all__ = [
    "CHUNK_HEADER", "Frame", "compress_speed", "decode_chunk", "encode_chunk", "encode_parts",
    "max_ratio_for_link",
]

CHUNK_HEADER = struct.Struct(">BQQ")
"""Header of every chunk frame: flags, raw length, xxh3_64 of the raw bytes."""

Buffer: TypeAlias = bytes | bytearray | memoryview
Frame: TypeAlias = Buffer | tuple[Buffer, Buffer]
"""A frame as one buffer, or as ``(header, payload)``."""

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
# lz4's speed before any chunk was timed (bytes/s, from the costs above); decompression
# is taken as twice as fast as compression.
_COMPRESS_PRIOR = 0.77e9
_TIMED_MIN_BYTES = 1 << 20  # smaller compressions say more about overheads than speed
_compress_speed = _COMPRESS_PRIOR


def compress_speed() -> float:
    """lz4's compression speed in this process, in bytes per second: a running average
    over the chunks of at least 1 MiB it compressed (a prior until the first)."""
    return _compress_speed


def max_ratio_for_link(link_bytes_per_second: float) -> float:
    """The largest compression ratio at which compressing pays on this link.

    A chunk of ``L`` bytes that compresses to ``r·L`` costs ``L/c + r·L/link + L/d``
    compressed (``c``, ``d``: lz4's compression and decompression speeds) against
    ``L/link`` raw, so compressing pays when ``r < 1 - link·(1/c + 1/d)``. Capped at
    90% (below which a sample must shrink at all); 0 (never) when the link outruns lz4.
    """
    speed = compress_speed()
    limit = 1.0 - link_bytes_per_second * (1.0 / speed + 1.0 / (2.0 * speed))
    return max(0.0, min(_MIN_RATIO, limit))


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
    view = _bytes_view(raw)
    checksum = xxhash.xxh3_64_intdigest(view)
    payload: Buffer = view
    if compress is None:
        mode = compression()
        limit = _MIN_RATIO if max_ratio is None else max_ratio
        compress = mode == "lz4" or (mode == "auto" and limit > 0
                                     and _sample_compresses(view, limit))
        if compress:
            payload = _compressed(view)
            if len(payload) >= len(view):  # the sample misled us: send it raw
                payload, compress = view, False
    elif compress:
        payload = _compressed(view)
    flags = _FLAG_LZ4 if compress else 0
    return CHUNK_HEADER.pack(flags, len(view), checksum), payload


def _sample_compresses(view: memoryview, limit: float) -> bool:
    start = max(0, (len(view) - _SAMPLE_BYTES) // 2)
    sample = view[start : start + _SAMPLE_BYTES]
    return len(lz4.block.compress(sample, store_size=False)) < limit * len(sample)


def _compressed(view: memoryview) -> bytes:
    """lz4 of ``view``, timed into :func:`compress_speed`."""
    global _compress_speed
    started = time.perf_counter()
    payload: bytes = lz4.block.compress(view, store_size=False)
    elapsed = time.perf_counter() - started
    if len(view) >= _TIMED_MIN_BYTES and elapsed > 0:
        # A running average; races between sender threads only blur it.
        _compress_speed = 0.7 * _compress_speed + 0.3 * (len(view) / elapsed)
    return payload


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
    if isinstance(frame, tuple):
        header, payload = _bytes_view(frame[0]), _bytes_view(frame[1])
    else:
        view = _bytes_view(frame)
        header, payload = view[: CHUNK_HEADER.size], view[CHUNK_HEADER.size :]
    if len(header) != CHUNK_HEADER.size:
        raise _corrupt(spec, f"its header is {len(header)} bytes, not {CHUNK_HEADER.size}")
    flags, length, checksum = CHUNK_HEADER.unpack(header)
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
    actual = xxhash.xxh3_64_intdigest(data)
    if actual != checksum:
        raise _corrupt(spec, f"checksum {actual:#018x} of its bytes, header says {checksum:#018x}")
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


def _bytes_view(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view
