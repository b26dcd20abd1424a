"""The writer of the packed format (:mod:`dckpt._formats._packing` defines it).

:class:`ArchiveWriter` streams entries into any binary stream; :func:`pack_directory`
and its two siblings pack a whole tree into a stream, bytes or a file renamed into
place.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, cast

import dask.config
import xxhash
from dask.utils import parse_bytes
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt._formats._atomic import atomic_file
from dckpt._formats._frames import Buffer, bytes_view, encode_frame
from dckpt._formats._packing import (
    CHECKSUM,
    CODES,
    FORMAT_VERSION,
    HEADER,
    IO_SLICE,
    MAGIC,
    MAX_PIECE_BYTES,
    PIECE,
    RECORD,
)
from dckpt._formats._paths import EntryIndex, EntryKind, safe_relpath
from dckpt._formats._tree import plan_tree
from dckpt.errors import CheckpointError


class ArchiveWriter:
    """Write the packed format to a binary stream (file, socket makefile, ``BytesIO``).

    Writes the current :data:`FORMAT_VERSION`. Files are streamed in pieces of
    ``dckpt.formats.write-chunk-bytes`` (capped at :data:`MAX_PIECE_BYTES`), never held
    whole, each stored raw or lz4-compressed as a sample of it decides. The pieces of
    one file, from the first that compresses, are encoded by
    ``dckpt.formats.pack-threads`` threads at once while the next piece is read, and
    written in order; lz4 releases the GIL, so compressible data packs up to that many
    times faster, for that many pieces more of memory. Use as a
    context manager: on a clean exit :meth:`close` writes the end record (``out``
    stays open). If the block raises, or an entry fails half-written, no end record is
    written, so readers refuse the partial output as truncated. Every path passes
    ``safe_relpath`` and the checks readers make, so the writer cannot produce an
    archive that would be refused.

    Parameters
    ----------
    out
        Where the bytes go; written to at once (the header).
    compression_level
        lz4 level for the pieces worth compressing (below 3 lz4's fast mode, 3-16
        its high-compression mode); ``dckpt.formats.compression-level`` when ``None``.
    """

    _out: BinaryIO
    _level: int
    _chain: xxhash.xxh3_64
    _index: EntryIndex
    _count: int
    _closed: bool
    _broken: bool

    def __init__(self, out: BinaryIO, *, compression_level: int | None = None) -> None:
        if compression_level is None:
            compression_level = int(dask.config.get("dckpt.formats.compression-level"))
        self._out = out
        self._level = compression_level
        self._chain = xxhash.xxh3_64()
        self._index = EntryIndex()
        self._count = 0
        self._closed = False
        self._broken = False
        out.write(HEADER.pack(MAGIC, FORMAT_VERSION, 0))

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._broken = True
            self._closed = True

    def add_bytes(self, relpath: str, data: bytes, *, mode: int = 0o644) -> None:
        """Add a file with content ``data``."""
        relpath = self._register(relpath, "file")
        view = bytes_view(data)
        step = _piece_bytes()
        with self._writing(), self._pieces(len(view), step) as pieces:
            self._write_record("file", mode, view.nbytes, relpath)
            for start in range(0, len(view), step):
                pieces.add(view[start : start + step])

    def add_file(
        self,
        relpath: str,
        path: str | os.PathLike[str],
        *,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> None:
        """Add the file at ``path`` (symlinks followed), streamed in pieces.

        The size recorded is the opened file's; a file that changes size while it is
        read raises :class:`~dckpt.errors.CheckpointError` and leaves the writer
        unusable. ``callback`` gets ``set_size(bytes)`` and one update per chunk.
        """
        self._check_open()
        relpath = safe_relpath(relpath)
        chunk_bytes = _piece_bytes()
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"cannot pack {os.fspath(path)!r}: not a regular file")
            size = st.st_size
            self._register(relpath, "file")
            callback.set_size(size)
            piece_bytes = max(1, min(chunk_bytes, size))
            # Buffers whose piece is written: the next reads go into them.
            free: list[memoryview] = []
            with self._writing(), self._pieces(size, piece_bytes) as pieces:
                self._write_record("file", st.st_mode, size, relpath)
                remaining = size
                while remaining:
                    buffer = free.pop() if free else memoryview(bytearray(piece_bytes))
                    n = _fill_piece(f, buffer[: min(remaining, len(buffer))])
                    if not n:
                        raise _changed(path, size, "shrank from")
                    pieces.add(buffer[:n], functools.partial(free.append, buffer))
                    remaining -= n
                    callback.relative_update(n)
                if f.read(1):
                    raise _changed(path, size, "grew beyond")

    def add_directory(self, relpath: str, *, mode: int = 0o755) -> None:
        """Add a directory (so that it exists after unpacking even when empty)."""
        relpath = self._register(relpath, "directory")
        with self._writing():
            self._write_record("directory", mode, 0, relpath)

    def add_symlink(self, relpath: str, target: str) -> None:
        """Add a relative symlink; one leading outside the tree raises ``UnsafePathError``."""
        relpath = self._register(relpath, "symlink", target)
        encoded = target.encode("utf-8")
        with self._writing():
            self._write_record("symlink", 0o777, len(encoded), relpath, encoded)

    def add_tree(
        self,
        root: str | os.PathLike[str],
        *,
        prefix: str = "",
        exclude: Callable[[str], bool] | None = None,
        callback: Callback = DEFAULT_CALLBACK,
    ) -> None:
        """Add everything below ``root``, in sorted order, under ``prefix``.

        Directories become entries of their own (empty ones survive). A symlink whose
        relative target stays inside ``root`` (decided lexically, with every ``..``
        leading) is kept as a symlink; any other is dereferenced as ``shutil.copytree``
        does, as is every symlink below a dereferenced directory. Dangling outside links,
        sockets, FIFOs, devices and directory cycles are skipped with a warning.

        Parameters
        ----------
        root
            The directory to add. With a ``prefix``, the prefix itself is added as a
            directory carrying ``root``'s mode.
        prefix
            Prepended to every entry's path.
        exclude
            Called with each path relative to ``root`` (``/``-separated, no prefix);
            ``True`` drops the entry and, for a directory, everything below it.
        callback
            ``set_size(number of files)``, a branched child per file for its bytes,
            and ``relative_update(1)`` after each file.
        """
        self._check_open()
        root = os.fspath(root)
        root_stat = os.stat(root)
        if not stat.S_ISDIR(root_stat.st_mode):
            raise NotADirectoryError(f"cannot pack {root!r}: not a directory")
        plan = plan_tree(root, exclude)
        callback.set_size(sum(1 for kind, _, _ in plan if kind == "file"))
        if prefix:
            self.add_directory(prefix, mode=root_stat.st_mode)

        def full(relpath: str) -> str:
            return f"{prefix}/{relpath}" if prefix else relpath

        for kind, relpath, value in plan:
            if kind == "directory":
                assert isinstance(value, int)
                self.add_directory(full(relpath), mode=value)
            elif kind == "symlink":
                assert isinstance(value, str)
                self.add_symlink(full(relpath), value)
            else:
                assert isinstance(value, str)
                with callback.branched(value, full(relpath)) as child:
                    self.add_file(full(relpath), value, callback=child)
                callback.relative_update(1)

    def close(self) -> None:
        """Write the end record; ``out`` stays open."""
        if self._closed:
            return
        self._closed = True
        if self._broken:
            return
        self._write_raw_record(b"Z", 0, self._count, b"", self._chain.digest())
        self._out.flush()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this ArchiveWriter is closed")
        if self._broken:
            raise CheckpointError("an earlier entry failed half-written; the archive is unusable")

    def _register(self, relpath: str, kind: EntryKind, target: str | None = None) -> str:
        self._check_open()
        relpath = safe_relpath(relpath)
        self._index.add(relpath, kind, target)
        return relpath

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Mark the writer broken if an entry fails after its first byte was written."""
        try:
            yield
        except BaseException:
            self._broken = True
            raise
        self._count += 1

    def _write_record(
        self, kind: EntryKind, mode: int, size: int, relpath: str, extra: bytes = b""
    ) -> None:
        self._write_raw_record(CODES[kind], mode & 0o777, size, relpath.encode("utf-8"), extra)

    def _write_raw_record(
        self, code: bytes, mode: int, size: int, path: bytes, extra: bytes
    ) -> None:
        body = RECORD.pack(code, mode, size, len(path)) + path + extra
        checksum = CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))
        self._chain.update(checksum)
        self._out.write(body + checksum)

    @contextlib.contextmanager
    def _pieces(self, size: int, piece_bytes: int) -> Iterator[_Pieces]:
        """The pieces of one file of ``size`` bytes, written in order by the end of the
        block; with threads from its first piece that compresses, if it has two pieces
        or more of :data:`_THREADED_PIECE_BYTES` and up."""
        threads = _pack_threads()
        if threads < 2 or piece_bytes < _THREADED_PIECE_BYTES or size < 2 * piece_bytes:
            yield _Pieces(self, None, 0)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="dckpt-pack") as pool:
            pieces = _Pieces(self, pool, threads)
            try:
                yield pieces
            except BaseException:
                pieces.abandon()
                raise
            pieces.finish()

    def _encode(self, raw: memoryview) -> tuple[bytes, Buffer]:
        return encode_frame(raw, level=self._level)

    def _write_frame(self, header: bytes, payload: Buffer) -> None:
        prefix = PIECE.pack(len(payload)) + header
        self._chain.update(prefix)
        self._out.write(prefix)
        view = bytes_view(payload)
        for start in range(0, len(view), IO_SLICE):
            self._out.write(view[start : start + IO_SLICE])


class _Pieces:
    """One file's pieces on their way out, written in the order they came: encoded
    here until one compresses, then in ``pool`` (up to ``depth`` at once) if given.

    ``add(raw, done)``: ``raw`` must stay unchanged until ``done()`` is called, once its
    piece is written; :meth:`finish` writes the rest.
    """

    def __init__(self, writer: ArchiveWriter, pool: ThreadPoolExecutor | None,
                 depth: int) -> None:
        self._writer = writer
        self._pool = pool
        self._depth = depth
        self._threaded = False  # from the first piece that compressed, with a pool
        self._pending: collections.deque[
            tuple[Future[tuple[bytes, Buffer]], Callable[[], None] | None]
        ] = collections.deque()

    def add(self, raw: memoryview, done: Callable[[], None] | None = None) -> None:
        if not self._threaded:
            header, payload = self._writer._encode(raw)
            self._writer._write_frame(header, payload)
            if done is not None:
                done()
            # Threads pay only where lz4 runs: raw pieces (weights) cost a hash, which
            # is cheaper here than a hand-over and the memory of more buffers.
            self._threaded = self._pool is not None and len(payload) < len(raw)
            return
        assert self._pool is not None  # threaded only with one
        self._pending.append((self._pool.submit(self._writer._encode, raw), done))
        while len(self._pending) > self._depth:
            self._write_oldest()

    def finish(self) -> None:
        while self._pending:
            self._write_oldest()

    def abandon(self) -> None:
        """Drop what is not written (the entry failed); encodings not started never run."""
        for job, _ in self._pending:
            job.cancel()
        self._pending.clear()

    def _write_oldest(self) -> None:
        job, done = self._pending.popleft()
        self._writer._write_frame(*job.result())
        if done is not None:
            done()


#: Pieces smaller than this are encoded in the packing thread: a hand-over to another
#: thread would cost more than the encoding.
_THREADED_PIECE_BYTES = 1 << 20


def _pack_threads() -> int:
    """``dckpt.formats.pack-threads``, at least 1."""
    return max(1, int(dask.config.get("dckpt.formats.pack-threads")))


def _fill_piece(f: io.FileIO, view: memoryview) -> int:
    """Read into ``view`` in slices of IO_SLICE until it is full or the file ends."""
    filled = 0
    while filled < len(view):
        n = f.readinto(view[filled : filled + IO_SLICE])
        if not n:
            break
        filled += n
    return filled


def _piece_bytes() -> int:
    """``dckpt.formats.write-chunk-bytes``, at least 1 and at most MAX_PIECE_BYTES."""
    value = parse_bytes(dask.config.get("dckpt.formats.write-chunk-bytes"))
    return max(1, min(int(value), MAX_PIECE_BYTES))


def _changed(path: str | os.PathLike[str], size: int, how: str) -> CheckpointError:
    return CheckpointError(
        f"{os.fspath(path)!r} {how} {size} bytes while it was being packed; "
        "pack only files that nobody is writing to"
    )


def pack_directory(
    root: str | os.PathLike[str],
    out: BinaryIO,
    *,
    exclude: Callable[[str], bool] | None = None,
    callback: Callback = DEFAULT_CALLBACK,
) -> None:
    """Write the tree below ``root`` to ``out`` in the packed format.

    See :meth:`ArchiveWriter.add_tree` for symlinks, ``exclude`` and ``callback``.
    """
    with ArchiveWriter(out) as writer:
        writer.add_tree(root, exclude=exclude, callback=callback)


def pack_directory_to_bytes(
    root: str | os.PathLike[str], *, exclude: Callable[[str], bool] | None = None
) -> bytes:
    """The tree below ``root`` in the packed format, as bytes."""
    out = io.BytesIO()
    pack_directory(root, out, exclude=exclude)
    return out.getvalue()


def pack_directory_to_file(
    root: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    exclude: Callable[[str], bool] | None = None,
    callback: Callback = DEFAULT_CALLBACK,
) -> None:
    """Write the tree below ``root`` to the file ``path`` in the packed format.

    Streams (memory stays at a few MiB whatever the tree's size) into a hidden sibling
    of ``path``, renamed into place once complete: ``path`` holds the old file or the
    whole new one, never a part. An existing ``path`` is replaced. See
    :func:`pack_directory` for ``exclude`` and ``callback``.
    """
    with atomic_file(path) as out:
        pack_directory(root, cast(BinaryIO, out), exclude=exclude, callback=callback)
