"""Each fetched file's hash, computed from its chunks as the receiver writes them
(:func:`~dckpt._transfer.receive_directory`)."""

from __future__ import annotations

import threading

import xxhash

from dckpt._transfer._manifest import ChunkSpec

__all__ = ["FileHashing"]


class FileHashing:
    """Each fetched file's xxh3-128, computed from its chunks as they are written.

    Hashing a chunk while it is in memory spares reading every file back once it is
    complete (0.1 s per GiB from the page cache, after the last chunk: time no other
    work overlaps); hashing each piece of it right after its write (:meth:`claim`),
    while the piece is in the CPU's cache, spares reading the chunk from memory again.
    A file's hash needs its bytes in order: a chunk waits for the chunk before it in
    its file while that one is being written (``max-in-flight`` above 1), and a file
    whose chunks came out of order anyway (a chunk fetched again, a stream that answers
    in another order) is left out of :meth:`digests` and read back as before. Only
    chunks that passed their checksum and were written are hashed, each once: the hash
    is of the bytes the file holds.
    """

    # A chunk waits at most this long for the one before it (which ends by being written,
    # failing or being cancelled, each of which wakes it); past it, the file is read back.
    _WAIT_SECONDS = 60.0

    def __init__(self, sizes: dict[int, int]) -> None:
        """``sizes``: the files to hash, index -> size."""
        self._condition = threading.Condition()
        self._sizes = sizes
        self._hashers = {index: xxhash.xxh3_128() for index in sizes}
        self._next = dict.fromkeys(sizes, 0)  # the offset each file's hash has reached
        self._in_flight: dict[int, set[int]] = {index: set() for index in sizes}
        # The header checksum of each chunk hashed, in order: a sender serving the copy
        # reads nothing for them (chunk_checksums in _hashes).
        self._checksums: dict[int, list[int]] = {index: [] for index in sizes}

    def begin(self, spec: ChunkSpec) -> None:
        """``spec`` is on its way to be written (event loop)."""
        with self._condition:
            if spec.file_index in self._hashers:
                self._in_flight[spec.file_index].add(spec.offset)

    def drop(self, spec: ChunkSpec) -> None:
        """``spec`` will not be hashed (it failed, or was cancelled): its file is read back."""
        with self._condition:
            self._end(spec, broken=True)

    def claim(self, spec: ChunkSpec) -> xxhash.xxh3_128 | None:
        """The hasher of ``spec``'s file if its hash has reached ``spec`` now, else None
        (thread, before writing it; does not wait).

        The caller then feeds it exactly ``spec``'s bytes, in order, and calls
        :meth:`claimed_done` (or :meth:`drop`, if the chunk is not written after all).
        No other chunk can touch the hasher meanwhile: the next one waits for this one
        (:meth:`begin` put it in flight), and no earlier one is left.
        """
        with self._condition:
            index = spec.file_index
            if index in self._hashers and self._next[index] == spec.offset:
                return self._hashers[index]
            return None

    def claimed_done(self, spec: ChunkSpec, checksum: int) -> None:
        """The bytes of ``spec``, written and checked against ``checksum`` (their
        xxh3_64), went into the hasher :meth:`claim` gave (thread)."""
        with self._condition:
            self._advance(spec, checksum)

    def add(self, spec: ChunkSpec, data: memoryview, checksum: int) -> None:
        """The bytes of ``spec``, written and checked against ``checksum`` (their
        xxh3_64): into its file's hash (thread)."""
        index = spec.file_index
        with self._condition:
            if index not in self._hashers:
                return
            # The chunk before this one is being written: its bytes go first.
            self._condition.wait_for(
                lambda: index not in self._hashers or self._next[index] == spec.offset
                or self._next[index] not in self._in_flight[index],
                self._WAIT_SECONDS,
            )
            if index in self._hashers and self._next[index] == spec.offset:
                self._hashers[index].update(data)
                self._advance(spec, checksum)
            else:
                self._end(spec, broken=True)

    def digests(self) -> dict[int, str]:
        """The hash of each file whose every byte was hashed in order (hex), by index;
        the others must be read back."""
        with self._condition:
            return {index: hasher.hexdigest() for index, hasher in self._hashers.items()
                    if self._next[index] == self._sizes[index]}

    def checksums(self) -> dict[int, tuple[int, ...]]:
        """For each file of :meth:`digests`, the checksums of its chunks in order."""
        with self._condition:
            return {index: tuple(self._checksums[index]) for index in self._hashers
                    if self._next[index] == self._sizes[index]}

    def _advance(self, spec: ChunkSpec, checksum: int) -> None:
        """``spec``'s bytes are in its file's hash (condition held)."""
        if spec.file_index in self._hashers:
            self._next[spec.file_index] += spec.length
            self._checksums[spec.file_index].append(checksum)
        self._end(spec, broken=False)

    def _end(self, spec: ChunkSpec, *, broken: bool) -> None:
        index = spec.file_index
        if index not in self._hashers:
            return
        self._in_flight[index].discard(spec.offset)
        if broken:
            del self._hashers[index], self._next[index], self._in_flight[index]
            del self._checksums[index]
        self._condition.notify_all()
