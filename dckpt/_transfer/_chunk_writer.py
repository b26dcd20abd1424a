"""Chunks written by the stream that brings them, as their bytes land: the receiver's
one-thread path (:class:`ChunkWriter`).

:func:`~dckpt._transfer.receive_directory` normally takes each chunk's frame from its
stream on the event loop and writes it in a thread of its own. A stream that reads its
chunks in a thread of its own (the socket a node store takes from its comm,
:mod:`dckpt.cluster._chunk_receiver`) can instead be given a :class:`ChunkWriter` and
write each chunk there and then, in the thread that reads it; it yields
:class:`Written` in place of the frame, and the event loop only keeps count.

Why: on this project's 2-core machines, every hand-over of a chunk between the
stream's thread, the event loop and a writer thread waits for a core, and with the
sender busy on one of the two, those waits added up to as much as the writes (a
writer thread idle 0.6-0.9 s per GiB, busy 0.6-0.8 s). Here no hand-over stands
between two chunks, and no chunk is held in memory: each piece of
:data:`WRITE_PIECE_BYTES` is received into one small buffer, checksummed, written and
hashed into its file's hash while it is in the CPU's cache.

The price: a raw chunk is written before its checksum is known, so one that fails it
leaves wrong bytes in the partial file until it is fetched again (as a failed chunk
is) and rewritten, and its file's hash is then read back from what was written
(:class:`~dckpt._transfer._file_hashing.FileHashing`): nothing is committed that does
not hash to the manifest. A compressed chunk is received whole, then decoded and
checked before anything of it is written, as on the other path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dckpt._formats import check_checksum, raw_header_checksum
from dckpt._transfer._file_hashing import FileHashing
from dckpt._transfer._frames import Frame, describe_chunk, raw_checksum
from dckpt._transfer._manifest import ChunkSpec
from dckpt.errors import CorruptChunkError

__all__ = ["ChunkWriter", "WRITE_PIECE_BYTES", "Written", "open_chunk_file"]

WRITE_PIECE_BYTES = 256 << 10
"""The most one ``os.pwrite`` of a chunk writes.

A write of 2 MiB or more at once lets the kernel (ext4 with large folios, Linux 6.x)
put it in page-cache folios of 2 MiB, which come from the 2 MiB blocks of free memory:
the very blocks a VM with free page reporting has handed back to its host, so that each
is faulted in again. Measured on this project's machine, 1 GiB into a new file, 3 s
after as much was freed: 2.4 to 3.0 s of CPU in 8 MiB or 2 MiB writes, 0.24 to 0.45 s
in 1 MiB writes and 0.35 s in 256 KiB ones (0.3 s each right after the free). In the
receiving worker of ``benchmarks/bench_transfer.py`` 256 KiB writes did better than
1 MiB ones (1.0-1.2 against 1.4-1.9 s of receiver CPU per GiB, three runs each). The
socket copy there writes what each ``recv`` brings, 1 MiB at most.
"""


def open_chunk_file(path: str) -> int:
    """A file of a partial directory, opened to write chunks into (an fd to close).

    No ``O_CREAT``: a write that outlives a cancelled transfer cannot recreate anything
    in the partial directory being removed.
    """
    return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


@dataclass(frozen=True)
class Written:
    """What a stream given a :class:`ChunkWriter` yields for a chunk it wrote: ``error``
    if the chunk failed its checks (it is then fetched again, as a failed frame is)."""

    error: CorruptChunkError | None = None


class ChunkWriter:
    """Writes the chunks of one :func:`~dckpt._transfer.receive_directory` into their
    files, from the thread of the stream that reads them (one thread at a time).

    ``paths``: each file's path in the partial directory, by index; ``hashing``: the
    receive's file hashes; ``write_frame(frame, spec)``: how the receiver writes a frame
    it holds whole (a compressed one).
    """

    def __init__(self, paths: Sequence[str], hashing: FileHashing,
                 write_frame: Callable[[Frame, ChunkSpec], None]) -> None:
        self._paths = paths
        self._hashing = hashing
        self._write_frame = write_frame
        self._piece: memoryview | None = None  # allocated by the first raw chunk

    def raw(self, spec: ChunkSpec, header: bytes,
            fill: Callable[[memoryview], object]) -> Written:
        """Write the uncompressed chunk ``spec`` whose frame header is ``header``;
        ``fill(view)`` puts its next ``len(view)`` bytes into ``view`` (a socket's
        ``recv_exactly``).

        Returns ``Written(error)`` if the bytes written do not have the header's
        checksum. What ``fill`` raises (the socket went away), or a write (a full
        disk), is raised, the chunk unfinished.
        """
        expected = raw_header_checksum(header, spec.length, what=describe_chunk(spec))
        if self._piece is None:
            self._piece = memoryview(bytearray(WRITE_PIECE_BYTES))
        piece = self._piece
        checksum = raw_checksum()
        self._hashing.begin(spec)
        # Each piece goes into its file's hash as it is written, if that hash has
        # reached this chunk: it has, unless a chunk before it failed or came later.
        hasher = self._hashing.claim(spec)
        try:
            fd = open_chunk_file(self._paths[spec.file_index])
            try:
                done = 0
                while done < spec.length:
                    view = piece[: min(len(piece), spec.length - done)]
                    fill(view)
                    checksum.update(view)
                    written = 0
                    while written < len(view):
                        written += os.pwrite(fd, view[written:], spec.offset + done + written)
                    if hasher is not None:
                        hasher.update(view)
                    done += len(view)
            finally:
                os.close(fd)
            check_checksum(checksum.intdigest(), expected, describe_chunk(spec))
        except CorruptChunkError as e:
            self._hashing.drop(spec)  # its bytes went into the file's hash: read back
            return Written(e)
        except BaseException:
            self._hashing.drop(spec)
            raise
        if hasher is None:
            self._hashing.drop(spec)  # the hash never reached it: the file is read back
        else:
            self._hashing.claimed_done(spec, expected)
        return Written()

    def frame(self, spec: ChunkSpec, frame: Frame) -> Written:
        """Decode, check and write a chunk received whole (a compressed one), in this
        thread."""
        self._hashing.begin(spec)  # a no-op when receive_directory began it on the loop
        try:
            self._write_frame(frame, spec)
        except CorruptChunkError as e:
            self._hashing.drop(spec)
            return Written(e)
        except BaseException:
            self._hashing.drop(spec)
            raise
        return Written()
