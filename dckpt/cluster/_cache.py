"""The node cache: checkpoints copied to this node, kept within a byte budget.

A :class:`NodeCache` uses one folder on the node's local disk (by default
:func:`dckpt._node.cache_directory`) and shares it with every other process of the node
that uses the same folder: ``dask worker --nworkers 4`` starts four worker processes
with one node id, each with a ``NodeStore`` and a ``NodeCache``, and a checkpoint is
cached once per node, whichever of them fetched it. Checkpoints streamed from other
nodes, or downloaded from URIs, are written into a *staging* directory inside that
folder and then renamed into place, so a reader never sees half a checkpoint and the
rename never crosses filesystems. The folder holds

- the cached checkpoints, within a byte budget (``dckpt.cache.max-bytes``, read at the
  point of use) over every entry, whoever added it, enforced by evicting the least
  recently used first (a lookup by any process counts as a use);
- ``index.json``, the list of entries (see :mod:`dckpt.cluster._cache_index`). It is
  the truth: an operation reads it again when another process wrote it since;
- ``.lock``: every operation that reads or changes the index holds an ``flock`` on it
  (besides a thread lock), so that the processes take turns;
- ``.pins/``: a checkpoint in use is never evicted, by any process. A pin is a marker
  file named after its process (see :mod:`dckpt.cluster._cache_pins`); markers of
  processes that are gone are ignored and removed, so a crashed worker pins nothing;
- ``.transfers/``: the lock files of :meth:`NodeCache.transfer_lock`, with which one
  process of the node transfers a checkpoint while the others wait for it.

Identical files are stored once (:mod:`dckpt.cluster._cache_sharing`). The index lists
each entry's files with their content hashes and inodes; :meth:`NodeCache.share` offers
the cached files a new checkpoint shares with earlier ones (for a transfer to hard-link
instead of fetch), pins the entries they are in while it runs, and reserves only the
bytes that will be new. The budget counts bytes on disk: ``used_bytes`` is the sum of
the entries' sizes less every file whose inode an entry listed already, so a file linked
into two entries counts once, and evicting either of them leaves the figure right, as
the other still lists that inode (nothing is re-attributed: the figure is computed from
the entries that remain). An entry's ``size`` stays the size of its checkpoint. Eviction
frees what only the evicted entry holds; making room evicts until the entries that
remain, and the incoming one, fit. Files are only linked, never changed, so the entries
sharing one stay intact; a user who writes into a cached directory (which is the
cache's, read-only by contract) changes every entry that shares the file, and the next
transfer that checks it (every placed file is hashed) fetches it instead.

Hidden directories name the process that made them: ``.{name}.{pid}.{token}.partial``
for staging, ``.{name}.{pid}.{token}.evicted`` for directories set aside to delete (see
:mod:`dckpt.cluster._cache_names`). On
start, the index is trusted only as far as it checks out: entries whose directory is
gone are dropped; hidden leftovers of processes that are gone (a crash) are removed,
those of live processes are theirs to finish; anything else that no entry names is
removed; an index that cannot be read or does not validate is logged and rebuilt
empty. Entries that other processes added are kept, whatever this one knew of them.

Threads and processes: every public method may be called from any thread of any
process. Slow deletions (``rmtree`` of an evicted checkpoint, a staging directory that
lost a race) happen after the locks are released: under them a directory is only
renamed aside. Methods do blocking disk I/O in the calling thread (the locks, a small
index read or write, those deletions) and may wait for another process's operation, so
event-loop code should call them through a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator

import dask.config
from dask.utils import format_bytes, parse_bytes

from dckpt import _node, _transfer
from dckpt._locks import flocked
from dckpt.cluster._cache_index import (
    INDEX_NAME,
    CachedFile,
    CacheEntry,
    CheckpointId,
    IndexFile,
)
from dckpt.cluster._cache_names import (
    STAGING_TAG,
    TRASH_TAG,
    checkpoint_key,
    entry_dirname,
    is_leftover,
    owned_sibling,
    owner_is_alive,
)
from dckpt.cluster._cache_pins import CachePins
from dckpt.cluster._cache_sharing import (
    SharedFiles,
    check_files,
    distinct_bytes,
    files_of,
    offer,
)
from dckpt.errors import CacheFullError

__all__ = ["INDEX_NAME", "CacheEntry", "CheckpointId", "NodeCache", "SharedFiles"]

logger = logging.getLogger(__name__)

MAX_BYTES_SETTING = "dckpt.cache.max-bytes"
MAX_BYTES_VARIABLE = "DASK_DCKPT__CACHE__MAX_BYTES"

# The folder's bookkeeping, shared by its processes (see the module docstring).
_LOCK_NAME = ".lock"
_PINS_NAME = ".pins"
_TRANSFERS_NAME = ".transfers"
BOOKKEEPING_NAMES = frozenset({_LOCK_NAME, _PINS_NAME, _TRANSFERS_NAME})

_Key = tuple[CheckpointId, str]  # (checkpoint id, digest)


class NodeCache:
    """The cache of checkpoints copied to this node; safe across threads and processes.

    Any number of ``NodeCache`` objects, in one process or in several, may use one
    folder: they share its entries, budget, least-recently-used order and pins (see the
    module docstring). Only the eviction count of :meth:`stats` and the pin counts of
    :meth:`entries` are this object's own. Hits and misses are the store's to count
    (:class:`~dckpt.cluster._store.NodeStore`, once per request): a lookup here is
    often a second look within one request.

    Parameters
    ----------
    root
        The folder the cache uses; created if needed. Defaults to
        :func:`dckpt._node.cache_directory`. A folder that is not empty and holds no
        cache index is refused: the cache removes whatever it does not know about.
    max_bytes
        The byte budget, an int or a string such as ``"10GiB"``. Defaults to the
        setting ``dckpt.cache.max-bytes``, read each time it is needed. The processes
        sharing a folder should agree on it: each enforces its own over all entries.

    Raises
    ------
    ValueError
        If ``root`` holds files but no ``index.json``, or ``max_bytes`` is not a size.
    TypeError
        If ``max_bytes`` is neither an int nor a string.

    Examples
    --------
    >>> cache = NodeCache(root, max_bytes="1GiB")  # doctest: +SKIP
    >>> staging = cache.staging_directory(checkpoint_id)  # doctest: +SKIP
    >>> ...  # write the checkpoint's files into staging
    >>> path = cache.add(checkpoint_id, digest, staging, size)  # doctest: +SKIP
    >>> with cache.pinned(checkpoint_id):  # doctest: +SKIP
    ...     assert cache.lookup(checkpoint_id, digest) == path
    """

    root: str
    _index: IndexFile
    _lock_path: str
    _transfers_dir: str
    _max_bytes: int | None
    _lock: threading.Lock  # taken before the folder's flock, never after
    _entries: collections.OrderedDict[_Key, CacheEntry]  # as on disk; least recently used first
    _pins: CachePins  # this object's, and a view of every process's
    _dirty: bool  # the index on disk is behind _entries
    _evictions: int

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        max_bytes: int | str | None = None,
    ) -> None:
        self.root = (
            os.path.abspath(os.fspath(root)) if root is not None else _node.cache_directory()
        )
        self._index = IndexFile(self.root)
        self._lock_path = os.path.join(self.root, _LOCK_NAME)
        self._transfers_dir = os.path.join(self.root, _TRANSFERS_NAME)
        self._max_bytes = None if max_bytes is None else _parse_budget(max_bytes, "max_bytes")
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()
        self._dirty = False
        self._evictions = 0
        os.makedirs(self.root, exist_ok=True)
        _refuse_foreign(self.root)  # before writing anything into it
        with self._lock, flocked(self._lock_path) as lock_fd:
            self._pins = CachePins(os.path.join(self.root, _PINS_NAME))
            os.makedirs(self._transfers_dir, exist_ok=True)
            try:
                trash = self._start_locked(lock_fd)
            finally:
                self._flush_locked(lock_fd)
        _remove_all(trash)

    def __repr__(self) -> str:
        with self._shared():
            count, used = len(self._entries), self._used_locked()
        return f"<NodeCache {self.root!r}: {count} entries, {format_bytes(used)}>"

    # -- size and budget --------------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        """The byte budget: ``max_bytes`` if given, else ``dckpt.cache.max-bytes``."""
        if self._max_bytes is not None:
            return self._max_bytes
        return _parse_budget(dask.config.get(MAX_BYTES_SETTING), MAX_BYTES_SETTING)

    @property
    def used_bytes(self) -> int:
        """The bytes of every cached checkpoint, pinned or not, whoever added it; a file
        shared by several entries (one inode) counts once."""
        with self._shared():
            return self._used_locked()

    def reserve(self, size: int) -> None:
        """Make room for ``size`` more bytes, evicting least recently used first.

        Checkpoints pinned by any live process are never evicted. Nothing is held for
        the caller: the room may be taken by another :meth:`add` (of any process)
        before this caller's (which makes room again). Call it before a transfer to
        fail early.

        Raises
        ------
        CacheFullError
            If ``size`` does not fit even with every unpinned checkpoint evicted
            (then nothing is evicted), including when ``size`` alone exceeds the budget.
        ValueError
            If ``size`` is negative.
        """
        with self._shared():
            trash = self._make_room_locked(size)
        _remove_all(trash)

    def share(self, manifest: _transfer.Manifest | None, size: int) -> SharedFiles:
        """The cached files that an incoming checkpoint shares, and room for the rest.

        For each file of ``manifest`` whose content hash and size a complete entry
        lists, the path of that entry's file (the most recently used entry's) is
        offered; those entries are pinned until :meth:`SharedFiles.release`, so that no
        process evicts them while a transfer links from them. Then room is made for the
        bytes that will be new (:meth:`reserve`). If that room cannot be had with those
        entries kept, nothing is shared: their pins go and room is made for all
        ``size`` bytes (evicting them if need be), as without sharing.
        ``manifest=None`` (a download from a URI, whose files are not known in
        advance) shares nothing.

        Raises
        ------
        CacheFullError
            If even ``size`` bytes cannot be had, as :meth:`reserve`.
        """
        offered: dict[str, str] = {}
        pinned: tuple[CheckpointId, ...] = ()
        new_bytes = size
        if manifest is not None:
            with self._shared():
                entries = [e for e in reversed(self._entries.values())  # most recent first
                           if _is_real_directory(e.path)]
                offered, pinned = offer(entries, manifest)
                for checkpoint_id in pinned:
                    self._pins.pin(checkpoint_id)
            new_bytes -= sum(e.size for e in manifest.files if e.hash in offered)

        def unpin() -> None:
            with self._lock:
                for checkpoint_id in pinned:
                    self._pins.unpin(checkpoint_id)

        shared = SharedFiles(offered, max(0, new_bytes), pinned, unpin)
        try:
            self.reserve(shared.new_bytes)
        except CacheFullError:
            shared.release()
            if not offered:
                raise
            logger.info("no room for %d new bytes with the %d cached checkpoints they share "
                        "files with kept; receiving all %d bytes", shared.new_bytes,
                        len(pinned), size)
            self.reserve(size)
            return SharedFiles({}, size, ())
        except BaseException:
            shared.release()
            raise
        return shared

    # -- lookup and pins --------------------------------------------------------------

    def lookup(self, checkpoint_id: CheckpointId, digest: str) -> str | None:
        """The directory of ``checkpoint_id`` if it is cached with ``digest``.

        Whichever process added it. A hit makes the entry the most recently used.
        Copies of the same checkpoint with another digest are stale and are evicted,
        hit or miss, unless the checkpoint is pinned (its users keep them; they go at
        the next lookup or :meth:`add` after the last pin is released, or as the
        least recently used).

        Returns
        -------
        str or None
            The absolute path, or None (a miss).
        """
        key = (checkpoint_id, digest)
        path: str | None = None
        with self._shared():
            entry = self._entries.get(key)
            if entry is not None and not _is_real_directory(entry.path):
                logger.warning(
                    "the cached checkpoint %r at %s was removed behind the cache's back; "
                    "forgetting it", checkpoint_id, entry.path,
                )
                del self._entries[key]
                self._dirty = True
                entry = None
            trash = self._evict_stale_locked(checkpoint_id, digest)
            if entry is not None:
                self._touch_locked(key)
                path = entry.path
        _remove_all(trash)
        return path

    def pin(self, checkpoint_id: CheckpointId) -> None:
        """Keep ``checkpoint_id`` from eviction, by any process, until a matching :meth:`unpin`.

        Pins count, and may be taken before the checkpoint is cached: a user that pins
        first, then looks up or adds, cannot lose the directory in between. The first
        pin of this object on a checkpoint leaves a marker file that other processes
        see; it goes with the last :meth:`unpin`, with this object, or with the
        process (a dead process's markers are ignored).
        """
        with self._lock:
            self._pins.pin(checkpoint_id)

    def unpin(self, checkpoint_id: CheckpointId) -> None:
        """Release one pin of ``checkpoint_id`` taken by :meth:`pin` of this object.

        Raises
        ------
        ValueError
            If ``checkpoint_id`` is not pinned by this object.
        """
        with self._lock:
            self._pins.unpin(checkpoint_id)

    @contextlib.contextmanager
    def pinned(self, checkpoint_id: CheckpointId) -> Iterator[None]:
        """Pin ``checkpoint_id`` for the duration of a ``with`` block."""
        self.pin(checkpoint_id)
        try:
            yield
        finally:
            self.unpin(checkpoint_id)

    # -- adding -----------------------------------------------------------------------

    @contextlib.contextmanager
    def transfer_lock(self, checkpoint_id: CheckpointId) -> Iterator[None]:
        """Hold the node-wide lock on transferring ``checkpoint_id`` into this folder.

        Blocks until no other process of the node, and no other thread, holds it for
        the same checkpoint, however long that holder's transfer takes: call it from a
        thread (``asyncio.to_thread``), never on the event loop. A process that dies
        holding it releases it (the kernel drops its ``flock``).

        It is a lock only; with it, a node transfers a checkpoint once:

        1. :meth:`pin` the checkpoint, so that nobody evicts it once it is there;
        2. take ``transfer_lock``;
        3. :meth:`lookup` again: another process may have added it meanwhile;
        4. only if it is still missing, transfer it into a :meth:`staging_directory`
           and :meth:`add` it;
        5. release the lock, and unpin once done with the directory.

        Concurrent requests within one process should share one transfer (the
        ``NodeStore``'s single flight) rather than queue here one after the other.

        Examples
        --------
        >>> with cache.pinned(checkpoint_id):  # doctest: +SKIP
        ...     with cache.transfer_lock(checkpoint_id):
        ...         path = cache.lookup(checkpoint_id, digest)
        ...         if path is None:
        ...             staging = cache.staging_directory(checkpoint_id)
        ...             ...  # transfer into staging
        ...             path = cache.add(checkpoint_id, digest, staging, size)
        ...     ...  # use path
        """
        os.makedirs(self._transfers_dir, exist_ok=True)
        lock_path = os.path.join(self._transfers_dir, f"{checkpoint_key(checkpoint_id)}.lock")
        with flocked(lock_path):
            try:
                yield
            finally:
                # Unlinked while held (flocked allows it): waiters move on to a fresh
                # file, and no lock file per checkpoint ever fetched piles up.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)

    def staging_directory(self, checkpoint_id: CheckpointId) -> str:
        """A fresh, empty directory inside the cache folder to write a checkpoint into.

        Hand it to :meth:`add` when complete. If the transfer fails before that, the
        caller removes it (``shutil.rmtree``); a crash leaves it to the next cache to
        start on the folder once this process is gone: its name holds this pid.
        """
        staging = owned_sibling(self.root, checkpoint_id, STAGING_TAG)
        os.mkdir(staging)
        return staging

    def add(self, checkpoint_id: CheckpointId, digest: str, staging: str, size: int) -> str:
        """Move a complete checkpoint from ``staging`` into the cache.

        Room is made first (see :meth:`reserve`), then ``staging`` is renamed to its
        final directory and the index is written. Copies of ``checkpoint_id`` with
        another digest are stale and evicted, unless pinned.

        ``staging`` belongs to the cache from this call on: it is renamed into place,
        or removed — when the checkpoint is already cached with the same digest
        (another transfer, maybe of another process, won the race; its path is
        returned) and when adding fails (``CacheFullError``, an ``OSError``). Only a
        ``staging`` refused up front (``ValueError``) is left alone.

        Parameters
        ----------
        checkpoint_id, digest
            What ``staging`` holds.
        staging
            A directory from :meth:`staging_directory`, filled, or a directory inside
            one (then only that inner directory is renamed or removed; the staging
            directory around it stays the caller's to remove).
        size
            Its size in bytes (the sum of its files), counted against the budget;
            files it shares with entries already cached (hard links, one inode)
            count once.

        Returns
        -------
        str
            The absolute path of the cached directory.

        Raises
        ------
        CacheFullError
            If there is no room even with every unpinned checkpoint evicted.
        ValueError
            If ``staging`` is not a staging directory of this cache, or ``size`` is
            negative.
        """
        staging = os.path.abspath(os.fspath(staging))
        self._check_staging(staging)
        key = (checkpoint_id, digest)
        trash: list[str] = []
        placed = False
        try:
            files = files_of(staging)  # hashes remembered from the transfer: no reads
            with self._shared():
                existing = self._entries.get(key)
                if existing is not None and _is_real_directory(existing.path):
                    logger.debug(
                        "checkpoint %r is cached already; dropping %s", checkpoint_id, staging
                    )
                    self._touch_locked(key)
                    return existing.path
                if existing is not None:  # its directory vanished
                    del self._entries[key]
                    self._dirty = True
                trash += self._evict_stale_locked(checkpoint_id, digest)
                trash += self._make_room_locked(size, files)
                final = os.path.join(self.root, entry_dirname(checkpoint_id, digest))
                if os.path.lexists(final):
                    # No entry names it (checked above): a leftover. Move it aside.
                    trash += self._set_aside_locked(final)
                os.replace(staging, final)
                placed = True
                self._entries[key] = CacheEntry(
                    checkpoint_id, digest, size, final, last_used=self._now_locked(),
                    files=files,
                )
                self._dirty = True
                logger.debug("cached checkpoint %r (%d bytes) at %s", checkpoint_id, size, final)
                return final
        finally:
            if not placed:
                trash.append(staging)
            _remove_all(trash)

    # -- eviction and introspection ---------------------------------------------------

    def evict(self, checkpoint_id: CheckpointId) -> bool:
        """Remove ``checkpoint_id`` (every digest of it) from the cache.

        Returns
        -------
        bool
            True if something was evicted; False if it is pinned (by any live
            process) or not cached.
        """
        trash: list[str] = []
        with self._shared():
            if checkpoint_key(checkpoint_id) in self._pins.live_keys():
                return False
            keys = [key for key in self._entries if key[0] == checkpoint_id]
            for key in keys:
                trash += self._evict_locked(key)
        _remove_all(trash)
        return bool(keys)

    def entries(self) -> list[CacheEntry]:
        """Copies of the entries, least recently used first (most recently used last).

        Every entry of the folder, whoever added it; ``pins`` counts this object's.
        """
        with self._shared():
            return [
                dataclasses.replace(entry, pins=self._pins.count(entry.checkpoint_id))
                for entry in self._entries.values()
            ]

    def stats(self) -> dict[str, int]:
        """Figures of the folder now, and counters of this object since it was created.

        Returns
        -------
        dict
            Of the folder, shared by its processes: ``bytes_cached``, ``entries`` and
            ``pinned`` (entries pinned by any live process). Of this object only:
            ``evictions`` (checkpoints it removed for room, as stale or by
            :meth:`evict`).
        """
        with self._shared():
            pinned = self._pins.live_keys()
            return {
                "bytes_cached": self._used_locked(),
                "entries": len(self._entries),
                "evictions": self._evictions,
                "pinned": sum(1 for key in self._entries if checkpoint_key(key[0]) in pinned),
            }

    # -- internals (callers hold self._lock, and the flock where they say so) ---------

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        """Hold the thread lock and the folder's flock, with ``_entries`` as on disk.

        The index is read again only if someone wrote it since this object last read
        or wrote it; changes are written back on the way out, also when the block raises.
        """
        with self._lock, flocked(self._lock_path) as lock_fd:
            if self._index.changed(lock_fd):
                self._reload_locked(lock_fd)
            try:
                yield
            finally:
                self._flush_locked(lock_fd)

    def _used_locked(self) -> int:
        return distinct_bytes(self._entries.values())

    def _now_locked(self) -> float:
        # Never older than the most recent entry, so that last_used follows the LRU
        # order even when the clock steps back; a reload sorts by it.
        now = time.time()
        if self._entries:
            now = max(now, next(reversed(self._entries.values())).last_used)
        return now

    def _touch_locked(self, key: _Key) -> None:
        self._entries[key].last_used = self._now_locked()
        self._entries.move_to_end(key)
        self._dirty = True

    def _set_aside_locked(self, path: str) -> list[str]:
        """Rename ``path`` to a trash name of this process; returns what to delete.

        Under the flock, so that exactly one process deletes it, after the locks.
        """
        aside = owned_sibling(self.root, os.path.basename(path), TRASH_TAG)
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return []
        except OSError as e:
            logger.warning("could not remove %s from the node cache: %s", path, e)
            return []
        return [aside]

    def _evict_locked(self, key: _Key) -> list[str]:
        """Forget an entry and rename its directory aside; returns what to delete."""
        entry = self._entries.pop(key)
        self._dirty = True
        self._evictions += 1
        logger.debug("evicted checkpoint %r (%d bytes)", entry.checkpoint_id, entry.size)
        return self._set_aside_locked(entry.path)

    def _evict_stale_locked(self, checkpoint_id: CheckpointId, digest: str) -> list[str]:
        stale = [k for k in self._entries if k[0] == checkpoint_id and k[1] != digest]
        if not stale or checkpoint_key(checkpoint_id) in self._pins.live_keys():
            return []
        trash: list[str] = []
        for key in stale:
            logger.info("evicting checkpoint %r: digest %s is stale", checkpoint_id, key[1])
            trash += self._evict_locked(key)
        return trash

    def _make_room_locked(self, size: int, files: tuple[CachedFile, ...] = ()) -> list[str]:
        """Evict until the entries and an incoming one of ``size`` bytes (sharing the
        inodes of ``files`` with them) fit the budget; returns what to delete."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a number of bytes >= 0, not {size!r}")
        budget = self.max_bytes
        incoming = CacheEntry(CheckpointId(""), "", size, "", 0.0, files=files)

        def used_with(entries: list[CacheEntry]) -> int:
            return distinct_bytes([*entries, incoming])

        remaining = list(self._entries.values())  # least recently used first
        if used_with(remaining) <= budget:
            return []
        pinned_ids = self._pins.live_keys()
        kept = [e for e in remaining if checkpoint_key(e.checkpoint_id) in pinned_ids]
        pinned = distinct_bytes(kept)
        if distinct_bytes([incoming]) > budget:
            raise CacheFullError(
                f"a checkpoint of {size} bytes ({format_bytes(size)}) is larger than the "
                f"whole node cache at {self.root}, which may hold {budget} bytes "
                f"({format_bytes(budget)}); {pinned} bytes are pinned by checkpoints in "
                f"use. Raise `{MAX_BYTES_SETTING}` ({MAX_BYTES_VARIABLE}) on the workers."
            )
        if used_with(kept) > budget:
            raise CacheFullError(
                f"no room for {size} bytes ({format_bytes(size)}) in the node cache at "
                f"{self.root}: it may hold {budget} bytes ({format_bytes(budget)}) and "
                f"{pinned} bytes of it are pinned by checkpoints in use. Raise "
                f"`{MAX_BYTES_SETTING}` ({MAX_BYTES_VARIABLE}) on the workers, or release "
                "checkpoints sooner."
            )
        trash: list[str] = []
        for entry in list(remaining):
            if used_with(remaining) <= budget:
                break
            if checkpoint_key(entry.checkpoint_id) in pinned_ids:
                continue
            remaining.remove(entry)
            trash += self._evict_locked((entry.checkpoint_id, entry.digest))
        assert used_with(remaining) <= budget, (used_with(remaining), size, budget)
        return trash

    def _reload_locked(self, lock_fd: int) -> None:
        """Replace ``_entries`` by the index on disk; flock held."""
        try:
            records = self._index.read(lock_fd)
            self._dirty = False
        except (OSError, ValueError, RecursionError) as e:
            logger.warning(
                "the node cache index %s is unusable (%s); starting over with an empty "
                "index: the directories in %s become strays, removed by the next cache "
                "to start there", self._index.path, e, self.root,
            )
            records = []
            self._dirty = True
        self._entries = collections.OrderedDict(
            ((record.checkpoint_id, record.digest), record)
            for record in sorted(records, key=lambda r: r.last_used)  # stable: file order
        )

    def _flush_locked(self, lock_fd: int) -> None:
        if not self._dirty:
            return
        try:
            self._index.write(lock_fd, list(self._entries.values()))
        except OSError as e:
            # The cache still works; only a restart would forget the newest entries
            # (their directories are then removed as strays).
            logger.warning("could not write the node cache index %s: %s", self._index.path, e)
            return
        self._dirty = False

    def _check_staging(self, staging: str) -> None:
        # A staging directory, or a directory inside one (a transfer may build its
        # result there and rename it once complete).
        rel = os.path.relpath(staging, self.root)
        first = rel.split(os.sep, 1)[0]
        real_root = os.path.realpath(self.root)
        if (
            rel.startswith("..")
            or not (first.startswith(".") and first.endswith(f".{STAGING_TAG}"))
            or not os.path.realpath(staging).startswith(real_root + os.sep)
        ):
            raise ValueError(
                f"{staging!r} is not (inside) a staging directory of the node cache at "
                f"{self.root}; get one from NodeCache.staging_directory()"
            )
        if not _is_real_directory(staging):
            raise FileNotFoundError(f"the staging directory {staging!r} does not exist")

    def _start_locked(self, lock_fd: int) -> list[str]:
        """Read the index and tidy the folder; returns what to delete. Flock held."""
        if os.path.lexists(self._index.path):
            self._reload_locked(lock_fd)
        else:
            self._dirty = True  # the index marks the folder as the cache's
        for key, entry in list(self._entries.items()):
            if not _is_real_directory(entry.path):
                logger.info(
                    "dropping checkpoint %r from the node cache: %s is gone",
                    entry.checkpoint_id, entry.path,
                )
                del self._entries[key]
                self._dirty = True
            elif entry.files and not check_files(entry):
                logger.info("the files of cached checkpoint %r at %s are not those the index "
                            "lists; counting it by its size, sharing none of them",
                            entry.checkpoint_id, entry.path)
                entry.files = ()
                self._dirty = True
        keep = {os.path.basename(entry.path) for entry in self._entries.values()}
        keep |= BOOKKEEPING_NAMES
        if os.path.isfile(self._index.path) and not os.path.islink(self._index.path):
            keep.add(INDEX_NAME)  # rewritten by the flush when it was unusable
        trash: list[str] = []
        for name in os.listdir(self.root):
            if name in keep:
                continue
            if is_leftover(name):
                if owner_is_alive(name):
                    continue  # a live process's staging or trash: it finishes it
            else:
                logger.info("removing %s from the node cache: no index entry names it", name)
            trash += self._set_aside_locked(os.path.join(self.root, name))
        # A smaller budget than before a restart, or than the other processes': shrink
        # now. Pins of live processes are respected.
        trash += self._make_room_locked(0)
        return trash


# -- helpers --------------------------------------------------------------------------


def _refuse_foreign(root: str) -> None:
    """Raise ValueError if ``root`` holds files but is no node cache."""
    # Listed before the index is looked for: a cache writes its index before anything
    # else, so a concurrent first start is never taken for a foreign folder.
    names = os.listdir(root)
    if os.path.lexists(os.path.join(root, INDEX_NAME)):
        return
    foreign = sorted(n for n in names if not is_leftover(n) and n not in BOOKKEEPING_NAMES)
    if foreign:
        raise ValueError(
            f"{root} is not empty ({', '.join(foreign[:5])}) and holds no "
            f"{INDEX_NAME}: it is not a dckpt node cache, and the cache removes "
            "what it does not know. Give the cache a folder of its own "
            "(see `dckpt.node-root`)."
        )



def _parse_budget(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(
            f"{name} must be a size in bytes such as 10737418240 or '10GiB', not "
            f"{type(value).__name__} {value!r}"
        )
    try:
        parsed = parse_bytes(value)
    except ValueError as e:
        raise ValueError(
            f"{name} must be a size in bytes such as 10737418240 or '10GiB', not {value!r}"
        ) from e
    if parsed < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return int(parsed)


def _is_real_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _remove_all(paths: Iterable[str]) -> None:
    """Delete files and directories; never follows a symbolic link out."""
    for path in paths:
        try:
            if _is_real_directory(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("could not remove %s: %s", path, e)

