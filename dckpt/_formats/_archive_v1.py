"""Version 1 of the packed format, read only: records inside one lz4 frame.

:class:`FrameBody` gives :class:`~dckpt._formats._archive_reader.ArchiveReader` the
records and file contents of a version 1 stream (described in
:mod:`dckpt._formats._packing`); the reader checks them as it checks version 2's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import lz4.frame

from dckpt._formats._packing import (
    RECORD,
    RawRecord,
    check_lengths,
    corrupted,
    damaged,
    truncated,
)

# One input chunk plus one output chunk bounds the reader's memory.
_INPUT_CHUNK = 1 << 20
_OUTPUT_CHUNK = 1 << 20


class FrameBody:
    """Version 1: records inside one lz4 frame with block and content checksums."""

    def __init__(self, inp: BinaryIO, what: str) -> None:
        self._inp = inp
        self._what = what
        self._decompressor = lz4.frame.LZ4FrameDecompressor()
        self._buffer = b""
        self._pos = 0

    def next_record(self) -> RawRecord:
        code, mode, size, path_len = RECORD.unpack(self._take(RECORD.size))
        if code == b"Z":
            return RawRecord(code, mode, size, path_len, b"", None)
        check_lengths(self._what, code, size, path_len)
        path = self._take(path_len)
        target = self._take(size) if code == b"L" else None
        return RawRecord(code, mode, size, path_len, path, target)

    def pieces(self, size: int, path: str) -> Iterator[memoryview]:
        remaining = size
        while remaining:
            chunk = self._take_some(remaining)
            remaining -= len(chunk)
            yield memoryview(chunk)

    def finish(self) -> None:
        if self._pos < len(self._buffer) or self._fill():
            raise damaged(self._what, "holds data after its end record")
        if self._decompressor.unused_data or self._inp.read(1):
            raise damaged(self._what, "has trailing bytes after the end of the archive")

    def _take(self, n: int) -> bytes:
        """Exactly ``n`` decompressed bytes (``n`` is small: a record header or a name)."""
        while len(self._buffer) - self._pos < n:
            if not self._fill():
                raise truncated(self._what, "its compressed body ends inside a record")
        data = self._buffer[self._pos : self._pos + n]
        self._pos += n
        return data

    def _take_some(self, limit: int) -> bytes:
        """Between 1 and ``limit`` decompressed bytes."""
        if self._pos == len(self._buffer) and not self._fill():
            raise truncated(self._what, "its compressed body ends inside a file")
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
                    raise truncated(self._what, "the data ends before the archive does")
            else:
                raw = b""
            try:
                out = decompressor.decompress(raw, max_length=_OUTPUT_CHUNK)
            except RuntimeError as e:  # how python-lz4 reports bad checksums and headers
                raise corrupted(self._what, str(e)) from e
            if out:
                self._buffer = self._buffer[self._pos :] + out
                self._pos = 0
                return True
        return False
