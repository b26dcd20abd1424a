"""The sender's side of a transfer: chunks of a registered directory, read on demand."""

from __future__ import annotations

import collections
import os
import stat
import threading
from collections.abc import Callable

from dckpt._transfer._frames import Buffer, encode_parts, raw_checksum, raw_header
from dckpt._transfer._hashes import chunk_checksums
from dckpt._transfer._manifest import ChunkSpec, FileEntry, Manifest
from dckpt._transfer._settings import check_chunk_bytes, config_chunk_bytes
from dckpt.errors import CheckpointFormatError

__all__ = ["ChunkSource", "FileRegion"]

# A sender keeps at most this many files open at once; a checkpoint of thousands of
# small files must not exhaust a worker's descriptors (often 1024, sockets included).
_MAX_OPEN_FILES = 64
# read_region checksums a chunk through a buffer this large, one per reading thread: small
# enough to stay in the core's cache, so the bytes come from memory once.
_CHECKSUM_BLOCK = 1 << 20
_blocks = threading.local()


class FileRegion:
    """Bytes of a served file, to be sent from the file itself (``os.sendfile``).

    ``fd`` stays open until :meth:`close`, whatever happens to its :class:`ChunkSource`
    meanwhile; call it once the bytes are sent (or not sent after all).
    """

    __slots__ = ("fd", "offset", "length", "path", "_release")

    fd: int
    offset: int
    length: int
    path: str

    def __init__(self, fd: int, offset: int, length: int, path: str,
                 release: Callable[[], None]) -> None:
        self.fd, self.offset, self.length, self.path = fd, offset, length, path
        self._release: Callable[[], None] | None = release

    def close(self) -> None:
        """Let the source close ``fd`` (once no read uses it)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> FileRegion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _OpenFile:
    """A descriptor of a :class:`ChunkSource` and how many reads use it right now."""

    __slots__ = ("fd", "users", "retired", "checksums")

    fd: int
    users: int
    retired: bool
    checksums: tuple[int, ...] | None  # of its chunks, remembered with its hash

    def __init__(self, fd: int, checksums: tuple[int, ...] | None = None) -> None:
        self.fd = fd
        self.checksums = checksums
        self.users = 0
        self.retired = False


class ChunkSource:
    """Sender side: serves the chunks of one directory, as its manifest describes it.

    Thread-safe: reads use ``os.preadv`` (no shared file offset). :meth:`read_parts`
    reads into a buffer that it hands over (or the caller's), copying nothing;
    :meth:`read_chunk` joins those parts into one frame. Files are opened on first use
    and at most 64 stay open; a descriptor is closed only once no read uses it, so it
    can never be reused under a reader's feet.

    A file that no longer has the size the manifest gives, or is gone, raises
    :class:`~dckpt.errors.CheckpointFormatError`: the directory changed after it was
    registered, and the receiver must not get a mix of two versions.

    Parameters
    ----------
    root
        The directory the manifest was built from.
    manifest
        Its manifest; only its files are served.
    chunk_bytes
        The largest chunk served; ``dckpt.transfer.chunk-bytes`` when ``None``.
    """

    root: str
    manifest: Manifest
    chunk_bytes: int
    _lock: threading.Lock
    _files: collections.OrderedDict[int, _OpenFile]
    _closed: bool

    def __init__(
        self,
        root: str | os.PathLike[str],
        manifest: Manifest,
        chunk_bytes: int | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.manifest = manifest
        self.chunk_bytes = check_chunk_bytes(
            config_chunk_bytes() if chunk_bytes is None else chunk_bytes
        )
        self._lock = threading.Lock()
        self._files = collections.OrderedDict()
        self._closed = False

    def __enter__(self) -> ChunkSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_chunk(self, spec: ChunkSpec) -> bytes:
        """The encoded frame (:func:`~dckpt._transfer.encode_chunk`) of one chunk:
        :meth:`read_parts` joined into one buffer.

        Raises
        ------
        ValueError
            ``spec`` is not a chunk of a manifest file, or is longer than
            ``chunk_bytes``.
        CheckpointFormatError
            The file changed (size, type) or vanished since the manifest was built.
        """
        return b"".join(self.read_parts(spec))

    def read_parts(
        self, spec: ChunkSpec, buffer: bytearray | None = None, *,
        max_ratio: float | None = None,
    ) -> tuple[bytes, Buffer]:
        """One chunk as ``(header, payload)`` (:func:`~dckpt._transfer.encode_parts`).

        The chunk is read into ``buffer`` (at least ``spec.length`` long), or into a new
        one: an uncompressed payload is a view of it, nothing is copied, and it must
        stay untouched until the payload is sent. ``max_ratio`` goes to
        :func:`~dckpt._transfer.encode_parts` (when compression pays). Raises as
        :meth:`read_chunk`, and ValueError for a ``buffer`` too short.
        """
        entry = self._check(spec)  # before allocating what a request asks for
        if buffer is None:
            buffer = bytearray(spec.length)
        elif len(buffer) < spec.length:
            raise ValueError(f"a buffer of {len(buffer)} bytes cannot hold {spec.length}")
        view = memoryview(buffer)[: spec.length]
        self._read(spec, entry, view)
        return encode_parts(view, max_ratio=max_ratio)

    def read_region(self, spec: ChunkSpec) -> tuple[bytes, FileRegion]:
        """One chunk as the header of an uncompressed frame and the :class:`FileRegion`
        of its bytes, for a sender that sends them from the file (``os.sendfile``).

        The checksum is the one remembered with the file's hash when it was read for
        it, at this chunk size (:func:`~dckpt._transfer._hashes.chunk_checksums`), so
        nothing is read here; otherwise it is computed now, reading the chunk through a
        small buffer. Either way the bytes that go out are read later by the kernel. A
        file changed in between is caught by the receiver (the checksum, else the file
        hash), a file cut short by the sender's ``os.sendfile`` returning 0. Raises as
        :meth:`read_chunk`.
        """
        entry = self._check(spec)
        handle = self._acquire(spec.file_index, entry)
        try:
            checksum = self._known_checksum(handle, spec, entry)
            if checksum is None:
                checksum = self._checksum(handle.fd, spec, entry)
        except BaseException:
            self._release(handle)
            raise
        return raw_header(spec.length, checksum), FileRegion(
            handle.fd, spec.offset, spec.length, self._path(entry),
            lambda: self._release(handle))

    def close(self) -> None:
        """Close the files; reads in progress finish first, later ones raise."""
        with self._lock:
            self._closed = True
            handles = list(self._files.values())
            self._files.clear()
            for handle in handles:
                self._retire(handle)

    def _read(self, spec: ChunkSpec, entry: FileEntry, view: memoryview) -> None:
        handle = self._acquire(spec.file_index, entry)
        try:
            self._read_into(handle.fd, view, spec, entry)
        finally:
            self._release(handle)

    def _check(self, spec: ChunkSpec) -> FileEntry:
        files = self.manifest.files
        if not 0 <= spec.file_index < len(files):
            raise ValueError(f"no file #{spec.file_index} in this manifest of {len(files)} files")
        entry = files[spec.file_index]
        if not (0 <= spec.offset and 0 < spec.length <= self.chunk_bytes
                and spec.offset + spec.length <= entry.size):
            raise ValueError(
                f"no chunk of {spec.length} bytes at offset {spec.offset} in {entry.path!r} "
                f"({entry.size} bytes, chunks of at most {self.chunk_bytes} bytes)"
            )
        return entry

    def _path(self, entry: FileEntry) -> str:
        return os.path.join(self.root, *entry.path.split("/"))

    def _acquire(self, index: int, entry: FileEntry) -> _OpenFile:
        with self._lock:
            if self._closed:
                raise ValueError("this ChunkSource is closed")
            handle = self._files.get(index)
            if handle is None:
                handle = self._open(entry)
                self._files[index] = handle
                self._evict()
            self._files.move_to_end(index)
            handle.users += 1
            return handle

    def _open(self, entry: FileEntry) -> _OpenFile:
        path = self._path(entry)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise _changed(path, "is gone") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _changed(path, "is no longer a regular file")
            if st.st_size != entry.size:
                raise _changed(path, f"has {st.st_size} bytes, not {entry.size}")
        except BaseException:
            os.close(fd)
            raise
        return _OpenFile(fd, chunk_checksums(st, self.chunk_bytes))

    def _known_checksum(self, handle: _OpenFile, spec: ChunkSpec, entry: FileEntry) -> int | None:
        """The remembered checksum of ``spec``, if it is one of the chunks they are of."""
        index, within = divmod(spec.offset, self.chunk_bytes)
        if (handle.checksums is None or within
                or spec.length != min(self.chunk_bytes, entry.size - spec.offset)
                or index >= len(handle.checksums)):
            return None
        return handle.checksums[index]

    def _evict(self) -> None:
        # Oldest first; a file being read stays open until its reads end.
        for index in list(self._files):
            if len(self._files) <= _MAX_OPEN_FILES:
                break
            handle = self._files[index]
            if handle.users == 0:
                del self._files[index]
                self._retire(handle)

    def _retire(self, handle: _OpenFile) -> None:
        handle.retired = True
        if handle.users == 0:
            os.close(handle.fd)

    def _release(self, handle: _OpenFile) -> None:
        with self._lock:
            handle.users -= 1
            if handle.retired and handle.users == 0:
                os.close(handle.fd)

    def _checksum(self, fd: int, spec: ChunkSpec, entry: FileEntry) -> int:
        block = getattr(_blocks, "view", None)
        if block is None:
            block = _blocks.view = memoryview(bytearray(_CHECKSUM_BLOCK))
        checksum = raw_checksum()
        done = 0
        while done < spec.length:
            piece = block[: min(len(block), spec.length - done)]
            n = os.preadv(fd, [piece], spec.offset + done)
            if n == 0:
                raise _changed(
                    self._path(entry),
                    f"ends at byte {spec.offset + done}, before the {entry.size} bytes "
                    "of the manifest",
                )
            checksum.update(piece[:n])
            done += n
        return checksum.intdigest()

    def _read_into(self, fd: int, view: memoryview, spec: ChunkSpec, entry: FileEntry) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], spec.offset + done)
            if n == 0:
                raise _changed(
                    self._path(entry),
                    f"ends at byte {spec.offset + done}, before the {entry.size} bytes "
                    "of the manifest",
                )
            done += n


def _changed(path: str, how: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path!r} {how}: the directory changed after its manifest was built; "
        "register it again (a checkpoint must not change once registered)"
    )
