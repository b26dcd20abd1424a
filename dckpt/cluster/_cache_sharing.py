"""Identical files shared between node cache entries, and counted once.

Checkpoints of one run differ in a few files (the layers being fine-tuned) and share
the rest (frozen weights, tokenizers). A transfer into the node cache places the files
the cache holds already as hard links to the cached copies
(:func:`dckpt._transfer.receive_directory` with ``have``), so the entries share one set
of bytes on disk. This module holds what the cache needs for that:

- :func:`files_of`: the regular files of a directory about to become an entry, with
  their content hashes and inodes (:class:`~dckpt.cluster._cache_index.CachedFile`),
  kept in the index so that every process of the node, and a restarted one, knows what
  the cache holds without hashing it again;
- :func:`distinct_bytes`: the bytes a set of entries holds on disk, each inode
  counted once;
- :class:`SharedFiles`: the files of one incoming manifest that the cache can offer,
  with the entries they come from pinned while the transfer runs.

The hashes in the index only *propose* a file: the receiver reads the bytes of every
file it places and fetches the ones that no longer match, so a cached file changed
behind the cache's back is never taken for another.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable

from dckpt import _transfer
from dckpt.cluster._cache_index import CachedFile, CacheEntry, CheckpointId
from dckpt.errors import CacheFullError

__all__ = ["SharedFiles", "check_files", "distinct_bytes", "files_of", "with_room"]

logger = logging.getLogger(__name__)


def files_of(
    directory: str, manifest: _transfer.Manifest | None = None
) -> tuple[CachedFile, ...]:
    """The regular files below ``directory``, hashed (thread; blocking I/O).

    With ``manifest``, the manifest that ``directory`` was checked against as it was
    written (a transfer's: :func:`dckpt._transfer.receive_directory` hashes every file
    it writes), the hashes are its own and only the inodes are asked (``lstat``).
    Without, they come from :func:`dckpt._transfer.build_manifest`, which reads nothing
    for files this process hashed before and settled, and reads a download from a URI
    once. Why not the hashes a transfer remembered: a file changed a moment ago is
    "racily fresh" and not remembered (:mod:`dckpt._transfer._hashes`), and a transfer's
    last files always are: the cache read back all of a small checkpoint, and the last
    50 ms of a large one's writes (about 100 MiB at loopback speeds). A directory that
    cannot be described (a file removed meanwhile, a special file) gives ``()``: its
    entry is then counted by its size and offers nothing to share.
    """
    try:
        if manifest is None:
            manifest = _transfer.build_manifest(directory)
        files = []
        for entry in manifest.files:
            st = os.lstat(os.path.join(directory, *entry.path.split("/")))
            if stat.S_ISREG(st.st_mode):  # not a symlink out that the walk dereferenced
                files.append(CachedFile(entry.path, entry.hash, st.st_size, st.st_ino))
    except (OSError, ValueError) as e:
        logger.info("not sharing the files of %s: %s", directory, e)
        return ()
    return tuple(files)


def check_files(entry: CacheEntry) -> bool:
    """Whether every file ``entry`` lists is still there with its inode and size.

    ``stat`` calls only: a cache folder copied elsewhere (new inodes), or files removed
    or replaced behind the cache's back, make the list wrong, and a wrong list could
    count bytes as shared that are not.
    """
    for cached in entry.files:
        try:
            st = os.lstat(os.path.join(entry.path, *cached.path.split("/")))
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_size) != (cached.inode, cached.size):
            return False
    return True


def distinct_bytes(entries: Iterable[CacheEntry]) -> int:
    """The bytes ``entries`` hold on disk: each entry's size, less the files whose inode
    an earlier entry of ``entries`` (or an earlier file of the same entry) lists.

    Entries without a file list count their whole size. The figure does not depend on
    which entry holds a shared file "first" when sizes are the sums of their files (as
    the cache's are), so evicting any one of two sharing entries leaves the other's
    bytes counted, whole.
    """
    seen: set[int] = set()
    total = 0
    for entry in entries:
        shared = 0
        for cached in entry.files:
            if cached.inode in seen:
                shared += cached.size
            else:
                seen.add(cached.inode)
        total += max(0, entry.size - shared)
    return total


class SharedFiles:
    """The files of one incoming checkpoint that the node cache holds already.

    Made by :meth:`dckpt.cluster._cache.NodeCache.share`, which pins the entries they
    come from (so that no process evicts them while they are linked from) and reserves
    room for the bytes that will be new. Pass :meth:`have` to
    :func:`dckpt._transfer.receive_directory`; call :meth:`release` once the new entry
    is added, or the transfer failed.

    Attributes
    ----------
    offered
        ``file hash -> path of a cached file`` with that content.
    new_bytes
        The bytes of the manifest that the cache does not hold: what was reserved.
    pinned
        The checkpoint ids pinned for the files offered.
    """

    offered: dict[str, str]
    new_bytes: int
    pinned: tuple[CheckpointId, ...]
    _release: Callable[[], None] | None

    def __init__(self, offered: dict[str, str], new_bytes: int,
                 pinned: tuple[CheckpointId, ...],
                 release: Callable[[], None] | None = None) -> None:
        self.offered, self.new_bytes, self.pinned = offered, new_bytes, pinned
        self._release = release

    def have(self, file_hash: str) -> str | None:
        """The path of a cached file with content ``file_hash``, or None."""
        return self.offered.get(file_hash)

    def release(self) -> None:
        """Unpin what :meth:`NodeCache.share` pinned (once; later calls do nothing)."""
        release, self._release = self._release, None
        if release is not None:
            release()


def offer(
    entries: Iterable[CacheEntry], manifest: _transfer.Manifest
) -> tuple[dict[str, str], tuple[CheckpointId, ...]]:
    """For each file of ``manifest`` (not empty), a cached file of the same hash and
    size, most recently used entries first; and the entries offered from."""
    wanted = {(e.hash, e.size) for e in manifest.files if e.size}
    offered: dict[str, str] = {}
    sources: dict[CheckpointId, None] = {}
    for entry in entries:
        for cached in entry.files:
            if (cached.hash, cached.size) in wanted and cached.hash not in offered:
                offered[cached.hash] = os.path.join(entry.path, *cached.path.split("/"))
                sources[entry.checkpoint_id] = None
    return offered, tuple(sources)


def with_room(
    shared: SharedFiles, size: int, reserve: Callable[[int], None]
) -> SharedFiles:
    """``shared``, once ``reserve`` made room for the bytes it leaves new.

    If that room cannot be had with the entries it pins kept, nothing is shared: their
    pins go and room is made for all ``size`` bytes (evicting them if need be), as
    without sharing; :class:`~dckpt.errors.CacheFullError` if even that fails.
    """
    try:
        reserve(shared.new_bytes)
    except CacheFullError:
        shared.release()
        if not shared.offered:
            raise
        logger.info("no room for %d new bytes with the %d cached checkpoints they share "
                    "files with kept; receiving all %d bytes", shared.new_bytes,
                    len(shared.pinned), size)
        reserve(size)
        return SharedFiles({}, size, ())
    except BaseException:
        shared.release()
        raise
    return shared
