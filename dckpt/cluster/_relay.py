"""Serving a checkpoint on while it is still being received: the links of a broadcast.

When many nodes want one checkpoint at once, the registry points each new reader at a
node that is fetching it already (``dckpt_holders``, kind ``fetching``), so the bytes
travel down a chain — origin → reader 1 → reader 2 → … — and the origin sends each byte
about once instead of once per reader. A receiving store keeps a :class:`Relay` for the
transfer: the receiver marks each chunk once it passed its checksum and is written
(:func:`dckpt._transfer.receive_directory`'s ``on_written``), and a :class:`RelaySource`
serves a downstream reader's chunk requests from the staging directory, each as soon
as its bytes are there.

Nothing a relay serves is trusted more than what any holder serves: the downstream
reader checks every chunk's checksum and, at the end, every file's content hash. A
relay whose own transfer fails (its source died, a file did not hash right) fails its
readers, which then go on to the next holder.

Threads: the receiver marks chunks on the event loop; readers wait in the sender's
read thread (:class:`~dckpt.cluster._stream.serve_chunks` reads in a thread).
"""

from __future__ import annotations

import bisect
import threading
from types import TracebackType

import dask.config
from dask.utils import parse_timedelta

from dckpt import _transfer
from dckpt.errors import CheckpointError

__all__ = ["Relay", "RelaySource"]


class Relay:
    """The progress of one transfer into a staging directory, for readers downstream.

    ``root`` is where the files are now: the staging directory, then the cache entry
    it was renamed to (:meth:`moved`).
    """

    manifest: _transfer.Manifest
    root: str
    _written: dict[int, list[tuple[int, int]]]  # file index -> merged [start, end) ranges
    _failure: BaseException | None
    _moving: bool  # between the rename into the cache and :meth:`moved`
    _condition: threading.Condition

    def __init__(self, manifest: _transfer.Manifest, root: str) -> None:
        self.manifest = manifest
        self.root = root
        self._written = {}
        self._failure = None
        self._moving = False
        self._condition = threading.Condition()

    def written(self, spec: _transfer.ChunkSpec) -> None:
        """The bytes of ``spec`` are in place and passed their checksum."""
        with self._condition:
            ranges = self._written.setdefault(spec.file_index, [])
            _add_range(ranges, spec.offset, spec.offset + spec.length)
            self._condition.notify_all()

    def moving(self) -> None:
        """The directory is about to be renamed: readers wait for :meth:`moved`."""
        with self._condition:
            self._moving = True

    def moved(self, root: str) -> None:
        """The transfer completed and its directory is now ``root`` (in the cache)."""
        with self._condition:
            self.root = root
            self._moving = False
            self._written = {i: [(0, f.size)] for i, f in enumerate(self.manifest.files)}
            self._condition.notify_all()

    def fail(self, error: BaseException) -> None:
        """The transfer failed: readers waiting, and those to come, fail too."""
        with self._condition:
            self._failure = error
            self._condition.notify_all()

    def wait_for(self, spec: _transfer.ChunkSpec, timeout: float) -> str:
        """Block until the bytes of ``spec`` are written; the directory they are in.

        Raises :class:`~dckpt.errors.CheckpointError` if the transfer failed, or
        ``TimeoutError`` if nothing came within ``timeout`` seconds.
        """
        with self._condition:
            if not self._condition.wait_for(
                lambda: self._failure is not None or (self._has(spec) and not self._moving),
                timeout,
            ):
                raise TimeoutError(
                    f"the relay received nothing of {spec} for {timeout:g} s "
                    "(dckpt.transfer.stall-timeout)"
                )
            if self._failure is not None:
                raise CheckpointError(
                    f"this relay's own transfer failed: {self._failure!r}"
                ) from self._failure
            return self.root

    def _has(self, spec: _transfer.ChunkSpec) -> bool:
        ranges = self._written.get(spec.file_index, ())
        end = spec.offset + spec.length
        i = bisect.bisect_right(ranges, (spec.offset, float("inf"))) - 1
        return i >= 0 and ranges[i][0] <= spec.offset and ranges[i][1] >= end


class RelaySource:
    """A :class:`~dckpt._transfer.ChunkSource` over a :class:`Relay`'s directory.

    Each read waits until its chunk is written (up to ``dckpt.transfer.stall-timeout``),
    then reads it from wherever the directory is now.
    """

    manifest: _transfer.Manifest
    chunk_bytes: int
    _relay: Relay
    _source: _transfer.ChunkSource | None
    _lock: threading.Lock
    _timeout: float

    def __init__(self, relay: Relay, chunk_bytes: int) -> None:
        self.manifest = relay.manifest
        self.chunk_bytes = _transfer.check_chunk_bytes(chunk_bytes)
        self._relay = relay
        self._source = None
        self._lock = threading.Lock()
        self._timeout = parse_timedelta(dask.config.get("dckpt.transfer.stall-timeout"))

    def __enter__(self) -> RelaySource:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def read_parts(
        self, spec: _transfer.ChunkSpec, buffer: bytearray | None = None, *,
        max_ratio: float | None = None,
    ) -> tuple[bytes, _transfer.Buffer]:
        """Like :meth:`ChunkSource.read_parts`, once the chunk has arrived.

        Any failure is a :class:`~dckpt.errors.CheckpointError` of this relay (its
        reader then goes on to its next holder), never a claim about the data.
        """
        root = self._relay.wait_for(spec, self._timeout)
        try:
            return self._source_at(root).read_parts(spec, buffer, max_ratio=max_ratio)
        except CheckpointError:
            pass  # renamed into the cache between the wait and the open: read it there
        moved = self._relay.wait_for(spec, self._timeout)
        try:
            return self._source_at(moved).read_parts(spec, buffer, max_ratio=max_ratio)
        except CheckpointError as e:
            raise CheckpointError(f"this relay could not read {spec} it received: {e}") from e

    def read_region(
        self, spec: _transfer.ChunkSpec
    ) -> tuple[bytes, _transfer.FileRegion]:
        """Like :meth:`ChunkSource.read_region`, once the chunk has arrived; fails as
        :meth:`read_parts` does."""
        root = self._relay.wait_for(spec, self._timeout)
        try:
            return self._source_at(root).read_region(spec)
        except CheckpointError:
            pass  # renamed into the cache between the wait and the open: read it there
        moved = self._relay.wait_for(spec, self._timeout)
        try:
            return self._source_at(moved).read_region(spec)
        except CheckpointError as e:
            raise CheckpointError(f"this relay could not read {spec} it received: {e}") from e

    def close(self) -> None:
        with self._lock:
            if self._source is not None:
                self._source.close()
                self._source = None

    def _source_at(self, root: str) -> _transfer.ChunkSource:
        with self._lock:
            if self._source is None or self._source.root != root:
                if self._source is not None:
                    self._source.close()  # reads in progress finish first
                self._source = _transfer.ChunkSource(root, self.manifest, self.chunk_bytes)
            return self._source


def _add_range(ranges: list[tuple[int, int]], start: int, end: int) -> None:
    """Insert ``[start, end)`` into sorted, disjoint ``ranges``, merging neighbours."""
    i = bisect.bisect_left(ranges, (start, start))
    if i > 0 and ranges[i - 1][1] >= start:
        i -= 1
        start = ranges[i][0]
    j = i
    while j < len(ranges) and ranges[j][0] <= end:
        end = max(end, ranges[j][1])
        j += 1
    ranges[i:j] = [(start, end)]
