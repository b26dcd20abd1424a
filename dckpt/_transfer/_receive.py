"""The receiver's side of a transfer: a directory built from a stream of chunk frames.

The receiver does not care how frames travel: it asks a :data:`ChunkStream` for a list
of chunks and takes ``(spec, frame)`` pairs from it as they come. A node store's
stream is one Dask comm (:mod:`dckpt.cluster._stream`); tests feed frames straight
from a :class:`~dckpt._transfer.ChunkSource`.

A receiver that already holds some of the files (a node cache holding the previous
checkpoint of a run) says so with ``have``: those files are placed from the local copy
(:mod:`._place`) and only the chunks of the others are asked for. The sender needs no
change: it serves whatever chunks it is asked for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import stat
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Collection,
    Sequence,
)
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt._formats import atomic_directory
from dckpt._transfer._chunk_writer import (
    WRITE_PIECE_BYTES,
    ChunkWriter,
    Written,
    open_chunk_file,
)
from dckpt._transfer._file_hashing import FileHashing
from dckpt._transfer._frames import Frame, decode_chunk, frame_checksum
from dckpt._transfer._hashes import hash_file, remember
from dckpt._transfer._manifest import ChunkSpec, FileEntry, Manifest
from dckpt._transfer._place import Have, Placed, place_file
from dckpt._transfer._progress import ReceiveProgress, track, untrack
from dckpt._transfer._settings import (
    check_chunk_bytes,
    config_chunk_bytes,
    positive_setting,
)
from dckpt.errors import CorruptChunkError

__all__ = ["ChunkStream", "Have", "Received", "WRITE_PIECE_BYTES", "WritingStream",
           "receive_directory"]

logger = logging.getLogger(__name__)

ChunkStream: TypeAlias = Callable[
    [Sequence[ChunkSpec]], AsyncGenerator[tuple[ChunkSpec, Frame], None]
]
"""Asked for some chunks, yields ``(spec, frame)`` once for each, in any order."""

WritingStream: TypeAlias = Callable[
    [Sequence[ChunkSpec], ChunkWriter],
    AsyncGenerator[tuple[ChunkSpec, Frame | Written], None],
]
"""A :data:`ChunkStream` also given a :class:`~dckpt._transfer.ChunkWriter`, with which
it may write a chunk itself, as it reads it, and yield ``(spec, Written(...))`` for it."""



@dataclass(frozen=True)
class Received:
    """What :func:`receive_directory` did: where the file bytes came from.

    Attributes
    ----------
    fetched_bytes
        File bytes asked of the stream (raw, before compression): what crossed the
        wire. Retries of corrupt chunks are not counted twice.
    linked_bytes
        File bytes placed by a hard link to a file the receiver had (``have``), or to
        an earlier file of the same content in the manifest.
    copied_bytes
        File bytes placed by a local copy of a file the receiver had (another
        filesystem, another mode, or a link refused).
    """

    fetched_bytes: int
    linked_bytes: int = 0
    copied_bytes: int = 0



async def receive_directory(
    manifest: Manifest,
    stream: ChunkStream | WritingStream,
    target: str | os.PathLike[str],
    *,
    chunk_bytes: int | None = None,
    max_in_flight: int | None = None,
    retries: int | None = None,
    callback: Callback = DEFAULT_CALLBACK,
    in_place: bool = False,
    have: Have | None = None,
    on_written: Callable[[ChunkSpec], None] | None = None,
    source: str = "",
    writes: bool = False,
) -> Received:
    """Build the directory that ``manifest`` describes at ``target``, chunk by chunk.

    Runs on the event loop; blocking work goes to threads (``asyncio.to_thread``):
    creating the tree, decoding and writing each chunk, the final rename. The tree is
    built in a hidden sibling of ``target`` (``.{name}.{host}.{pid}.{token}.partial``),
    which replaces ``target`` (if it exists) by a rename once every chunk is written; on any
    failure, or cancellation, it is removed and the error raised. With ``in_place``,
    ``target`` is an empty directory that the caller staged and commits (a node cache's
    staging directory): the tree is built in it directly, and on failure the caller
    removes it.

    Each file is created at its full size (``os.ftruncate``), so chunks land in any
    order with ``os.pwrite``. At most ``max_in_flight`` frames are decoded and written
    at once, in threads, and one more is taken from ``stream`` meanwhile (received
    while the others are written, so that receiving and writing overlap); it waits
    until the oldest write is done. A stream that waits to be asked (as a Dask comm
    does) thus keeps memory at ``max_in_flight + 1`` chunks, and one that reuses
    ``max_in_flight + 1`` buffers in turn (a comm's raw chunks) never has one
    overwritten while its frame is written. Chunks that fail their checks are asked for again, in a
    new call of ``stream`` once the current one ends, ``retries`` times at most, with
    a warning each time. Symlinks are created last, then file modes (``mode & 0o777``)
    applied; directories get the default mode.

    With ``have``, files the receiver already holds are not asked for, nor the twins of
    a file (same content elsewhere in the manifest: asked for once, then linked to it).
    ``have(hash)``
    names a local file with that content hash (or None), and the file is placed from
    it (:func:`~dckpt._transfer._place.place_file`: a hard link when it is on the same
    filesystem with the same mode, else a copy) and its bytes hashed there and then.
    Only the chunks of the other files are asked of ``stream``. A local file that does
    not hash to what ``have`` promised (it changed behind its owner's back) is not
    used: that file is fetched like the others, with a warning.

    Why the bytes are read rather than a remembered hash trusted: a remembered hash
    is keyed by ``(device, inode, size, ctime)`` (:mod:`._hashes`), and ``os.link``
    itself sets the inode's ctime, so after the link the key is new whatever the
    bytes; trusting the key from before the link would let a write between that check
    and the link pass. Reading a file that is in the page cache costs about 0.12 s
    per GiB, the price of never committing a file that is not what the manifest says.

    Parameters
    ----------
    manifest
        What to build; its paths are checked again here, however it was made.
    stream
        Asked once for every chunk of the manifest (then for those to fetch again).
    target
        Where the directory goes; its parent is created if needed.
    chunk_bytes
        Size of the chunks asked for; ``dckpt.transfer.chunk-bytes`` when ``None``.
        Must not exceed the sender's.
    max_in_flight
        ``dckpt.transfer.max-in-flight`` when ``None``.
    retries
        ``dckpt.transfer.retries`` when ``None``.
    callback
        ``set_size(total bytes)``, then ``relative_update(length)`` per chunk written
        and per file placed from a local copy.
    on_written
        Called on the event loop with each chunk once it passed its checks and is
        written, and with one spec covering each file placed from a local copy (a
        relaying store serves it on from there); only while ``in_place`` means
        anything, since otherwise the tree is renamed at the end.
    in_place
        ``target`` is an empty directory the caller staged and commits.
    have
        ``have(file_hash)``: the path of a local regular file with that xxh3-128 hash,
        or None; ``mapping.get`` will do. Files are placed from it only when its size
        is the manifest's.
    source
        How to name the sender in :func:`~dckpt._transfer.receiving` and in the
        progress log (:mod:`dckpt._transfer._progress`).
    writes
        ``stream`` is a :data:`WritingStream`: it is also given a
        :class:`~dckpt._transfer.ChunkWriter`, and may write chunks itself
        (:mod:`dckpt._transfer._chunk_writer`).

    Returns
    -------
    Received
        How many file bytes were fetched, linked and copied.

    Raises
    ------
    CorruptChunkError
        A chunk still failed its checks after ``retries`` fetches again; or the
        stream sent a chunk that was not asked for, or ended without one that was;
        or a file's bytes, once written, do not have the hash the manifest gives.
    UnsafePathError, CheckpointFormatError
        The manifest is unsafe or malformed.
    """
    # A Manifest can be built by hand: check it as if it came off the wire.
    manifest = Manifest.from_dict(manifest.to_dict())
    chunk_bytes = check_chunk_bytes(config_chunk_bytes() if chunk_bytes is None else chunk_bytes)
    max_in_flight = positive_setting("max-in-flight", max_in_flight, 1)
    retries = positive_setting("retries", retries, 0)
    callback.set_size(manifest.total_bytes)
    started = time.perf_counter()
    tracked = track(ReceiveProgress(manifest.content_id, source, os.fspath(target),
                                     manifest.total_bytes))
    callback = _Tracking(callback, tracked)  # the page's 'fetching' and the INFO log
    try:
        async with _building(target, in_place) as staging:
            paths = [os.path.join(staging, *entry.path.split("/")) for entry in manifest.files]
            twins = _twins(manifest) if have is not None else {}
            placed = await asyncio.to_thread(_create_tree, staging, manifest, paths, have, twins)
            for index in placed:
                _placed_one(manifest, index, callback, on_written)
            wanted = [spec for spec in manifest.chunks(chunk_bytes)
                      if spec.file_index not in placed and spec.file_index not in twins]
            fetched = sum(spec.length for spec in wanted)
            hashing = FileHashing({i: manifest.files[i].size for i in
                                {spec.file_index for spec in wanted}
                                | {i for i, e in enumerate(manifest.files)
                                   if not e.size and i not in placed}})
            # Threads of its own rather than asyncio's default pool: glibc gives each thread
            # that allocates an arena, which keeps the chunks freed in it; a few writer
            # threads keep the memory a transfer leaves behind to a few chunks.
            writers = ThreadPoolExecutor(max_in_flight, thread_name_prefix="dckpt-receive")
            try:
                for attempt in range(retries + 1):
                    failed = await _receive_round(stream, wanted, paths, writers, max_in_flight,
                                                  callback, on_written, hashing, writes)
                    if not failed:
                        break
                    for spec, error in failed:
                        name = manifest.files[spec.file_index].path
                        if attempt == retries:
                            raise CorruptChunkError(
                                f"{name!r}: {error}; still corrupt after {retries + 1} fetches, "
                                "check the network and the sender's disk"
                            ) from error
                        logger.warning("%r: %s; fetching it again (retry %d of %d)",
                                       name, error, attempt + 1, retries)
                    wanted = [spec for spec, _ in failed]
            finally:
                writers.shutdown(wait=False)  # nothing runs: every write was awaited
            await asyncio.to_thread(_finish_tree, staging, manifest, paths, placed.keys() | twins,
                                    hashing.digests(), (chunk_bytes, hashing.checksums()))
            for index, how in (await asyncio.to_thread(_place_twins, manifest, paths, twins)).items():
                placed[index] = how
                _placed_one(manifest, index, callback, on_written)
        received = Received(
            fetched,
            sum(manifest.files[i].size for i, how in placed.items() if how is Placed.LINKED),
            sum(manifest.files[i].size for i, how in placed.items() if how is Placed.COPIED),
        )
        logger.debug("received %d files, %d bytes into %s in %.2f s (%d fetched, %d linked, "
                     "%d copied)", len(manifest.files), manifest.total_bytes, os.fspath(target),
                     time.perf_counter() - started, received.fetched_bytes,
                     received.linked_bytes, received.copied_bytes)
    finally:
        untrack(tracked)
    return received


class _Tracking(Callback):  # type: ignore[misc]  # fsspec's Callback is untyped
    """The caller's callback, with every byte also counted into a receive's progress."""

    def __init__(self, inner: Callback, tracked: Any) -> None:  # _progress.track's
        super().__init__()
        self._inner = inner
        self._tracked = tracked

    def set_size(self, size: int) -> None:
        self._inner.set_size(size)

    def relative_update(self, inc: int = 1) -> None:
        self._tracked.add(inc)
        self._inner.relative_update(inc)


def _placed_one(manifest: Manifest, index: int, callback: Callback,
                on_written: Callable[[ChunkSpec], None] | None) -> None:
    """Report a file placed from a local copy as if all its chunks were written."""
    size = manifest.files[index].size
    callback.relative_update(size)
    if on_written is not None and size:
        on_written(ChunkSpec(index, 0, size))


async def _receive_round(
    stream: ChunkStream | WritingStream,
    wanted: list[ChunkSpec],
    paths: list[str],
    writers: Executor,
    max_in_flight: int,
    callback: Callback,
    on_written: Callable[[ChunkSpec], None] | None = None,
    hashing: FileHashing | None = None,
    writes: bool = False,
) -> list[tuple[ChunkSpec, CorruptChunkError]]:
    """Ask ``stream`` for ``wanted`` and write what it yields; the chunks that failed."""
    missing = set(wanted)
    failed: list[tuple[ChunkSpec, CorruptChunkError]] = []
    writing: collections.deque[asyncio.Future[None]] = collections.deque()
    hashing = FileHashing({}) if hashing is None else hashing

    # Looked up at each call: tests replace _write_chunk.
    writer = ChunkWriter(paths, hashing, lambda frame, spec: _write_chunk(
        frame, spec, paths[spec.file_index], hashing))

    def done(spec: ChunkSpec, written: Written) -> None:
        if written.error is not None:
            failed.append((spec, written.error))
            return
        callback.relative_update(spec.length)
        if on_written is not None:
            on_written(spec)

    async def write(spec: ChunkSpec, frame: Frame) -> None:
        # In flight from now, on the loop: a later chunk of its file waits for it.
        hashing.begin(spec)
        try:
            written = await asyncio.get_running_loop().run_in_executor(
                writers, writer.frame, spec, frame)
        except BaseException:
            hashing.drop(spec)  # cancelled: a chunk after it must not wait for it
            raise
        done(spec, written)

    async def settle(limit: int) -> None:
        # Waits until fewer than ``limit`` writes run, retiring them oldest first (a
        # comm's ring of buffers is reused in that order); re-raises what a write raised.
        while len(writing) >= limit:
            oldest = writing[0]
            await asyncio.wait([oldest])
            writing.popleft()
            oldest.result()

    frames_of = (cast(WritingStream, stream)(wanted, writer) if writes
                 else cast(ChunkStream, stream)(wanted))
    try:
        async with contextlib.aclosing(frames_of) as frames:
            async for spec, frame in frames:
                if spec not in missing:
                    raise CorruptChunkError(
                        f"the sender sent chunk {spec}, which was not asked for or came twice"
                    )
                missing.discard(spec)
                if isinstance(frame, Written):  # the stream wrote it (_chunk_writer)
                    done(spec, frame)
                    continue
                # This frame came while the ones before it were written; it waits for
                # room, not the stream: receiving and writing overlap.
                await settle(max_in_flight)
                writing.append(asyncio.ensure_future(write(spec, frame)))
                del frame
        await settle(1)
    finally:
        for task in writing:
            task.cancel()
        await asyncio.gather(*writing, return_exceptions=True)
    if missing:
        raise CorruptChunkError(
            f"the sender's stream ended without {len(missing)} of the {len(wanted)} chunks "
            f"asked for (first: {min(missing, key=_order)})"
        )
    return sorted(failed, key=lambda item: _order(item[0]))


def _order(spec: ChunkSpec) -> tuple[int, int]:
    return spec.file_index, spec.offset


@contextlib.asynccontextmanager
async def _building(target: str | os.PathLike[str], in_place: bool) -> AsyncIterator[str]:
    """:func:`~dckpt._formats._atomic.atomic_directory`, with its disk work in threads.

    Removing a large partial directory, or an old ``target``, can take a while; the
    event loop must not wait for it. ``in_place``: ``target`` itself, which must be an
    empty directory.
    """
    if in_place:
        if await asyncio.to_thread(os.listdir, target):
            raise ValueError(f"cannot receive a checkpoint in place into {target}: "
                             "it is not empty")
        yield os.fspath(target)
        return
    manager = atomic_directory(target)
    staging = await asyncio.to_thread(manager.__enter__)
    try:
        yield staging
    except BaseException as e:
        await asyncio.to_thread(manager.__exit__, type(e), e, e.__traceback__)
        raise
    await asyncio.to_thread(manager.__exit__, None, None, None)


def _twins(manifest: Manifest) -> dict[int, int]:
    """Files with the content of an earlier file of the manifest: index -> that file's."""
    first: dict[tuple[str, int], int] = {}
    twins: dict[int, int] = {}
    for index, entry in enumerate(manifest.files):
        if entry.size:
            twins_of = first.setdefault((entry.hash, entry.size), index)
            if twins_of != index:
                twins[index] = twins_of
    return twins


def _create_tree(
    staging: str, manifest: Manifest, paths: list[str], have: Have | None,
    twins: dict[int, int],
) -> dict[int, Placed]:
    """Directories, then every file but ``twins``: placed from a local copy when
    ``have`` names one that checks out, else created at its full size for the chunks
    (thread).

    Returns how each placed file was placed, by its index in the manifest.
    """
    for name in manifest.directories:
        os.makedirs(os.path.join(staging, *name.split("/")), exist_ok=True)
    placed: dict[int, Placed] = {}
    for index, (entry, path) in enumerate(zip(manifest.files, paths)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if index in twins:
            continue  # placed once its first copy is complete (_place_twins)
        local = have(entry.hash) if have is not None and entry.size else None
        if local is not None:
            how = place_file(local, path, entry)
            if how is not None:
                placed[index] = how
                continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            if _mode_first(entry):
                os.fchmod(fd, entry.mode & 0o777)
            if entry.size:
                os.ftruncate(fd, entry.size)
        finally:
            os.close(fd)
    return placed


def _mode_first(entry: FileEntry) -> bool:
    """Whether a fetched file gets its mode when created rather than once complete.

    Before its chunks when the mode lets its owner write them, so that the last change
    to most files is their last write: a ``chmod`` after the hashes were checked would
    make every file "racily fresh" (:data:`~dckpt._transfer._hashes.SETTLE_NS`), and
    the cache, building the copy's manifest a moment later, would read the whole
    checkpoint back to hash it again (0.25 s per GiB, after the last chunk).
    """
    return bool(entry.mode & stat.S_IWUSR)


def _write_chunk(frame: Frame, spec: ChunkSpec, path: str, hashing: FileHashing) -> None:
    """Decode one frame, write it in place, and hash it into its file's hash (thread).

    Raises CorruptChunkError before writing anything of a frame that fails its checks.
    """
    data = decode_chunk(frame, spec)
    checksum = frame_checksum(frame)  # which data was just checked against
    # Its file's hash has reached this chunk: each piece goes into it right after its
    # write, from cache; otherwise once the chunk before it is hashed (a second read).
    hasher = hashing.claim(spec)
    fd = open_chunk_file(path)
    try:
        done = 0
        while done < len(data):
            written = os.pwrite(fd, data[done : done + WRITE_PIECE_BYTES], spec.offset + done)
            if hasher is not None:
                hasher.update(data[done : done + written])
            done += written
    finally:
        os.close(fd)
    if hasher is not None:
        hashing.claimed_done(spec, checksum)
    else:
        hashing.add(spec, data, checksum)


def _place_twins(
    manifest: Manifest, paths: list[str], twins: dict[int, int]
) -> dict[int, Placed]:
    """Each twin linked to (or copied from) its first copy, complete and checked by
    now, so that the same bytes cross the wire once (thread)."""
    placed: dict[int, Placed] = {}
    for index, first in twins.items():
        entry = manifest.files[index]
        how = place_file(paths[first], paths[index], entry)
        if how is None:  # the first copy passed its check a moment ago
            raise CorruptChunkError(
                f"{entry.path!r} could not be placed from {manifest.files[first].path!r}, "
                "which has the same content; was the directory changed while it was received?"
            )
        placed[index] = how
    return placed


def _finish_tree(
    staging: str, manifest: Manifest, paths: list[str], placed: Collection[int],
    hashed: dict[int, str] | None = None,
    checksums: tuple[int, dict[int, tuple[int, ...]]] | None = None,
) -> None:
    """Symlinks (only now that every file is written), the modes of files that could
    not have theirs from the start (:func:`_mode_first`), then each file's content
    checked against its hash (thread).

    The chunk checksums catch damage on the way; the file hashes catch a sender whose
    bytes are not those its manifest names (a file rewritten while it was sent). The
    hash of a file is the one computed from its chunks as they were written
    (``hashed``, by index: :class:`FileHashing`), else read from what was written (the
    page cache, mostly); either way it is left remembered
    (:func:`~dckpt._transfer._hashes.remember`), so building the manifest of the copy
    later reads nothing. So are, with ``checksums`` (the transfer's chunk size, and the
    checksums of each file hashed from its chunks, by index), its chunk checksums, so
    that a store serving the copy on reads nothing for them. Files placed from a local
    copy were given their mode and checked as they were placed (:func:`place_file`); a
    linked one is not touched again, as a ``chmod`` would change the inode it shares.
    Those, and the twins placed after this from their first copy, are in ``placed``.
    """
    for name, link_target in manifest.symlinks:
        path = os.path.join(staging, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(link_target, path)
    for index, (entry, path) in enumerate(zip(manifest.files, paths)):
        if index in placed:
            continue
        if not _mode_first(entry):
            os.chmod(path, entry.mode & 0o777)
        actual = hashed.get(index) if hashed is not None else None
        if actual is None:
            actual = hash_file(path)
        if actual != entry.hash:
            raise CorruptChunkError(
                f"{entry.path!r}: its bytes hash to {actual}, not to {entry.hash} as the "
                "manifest says; the sender's file changed while it was sent, or its disk "
                "returned other bytes"
            )
        chunks = None
        if checksums is not None and index in checksums[1]:
            chunks = (checksums[0], checksums[1][index])
        remember(path, actual, chunks)
