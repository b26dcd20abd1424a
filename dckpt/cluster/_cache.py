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
bytes that will be new. Files are only linked, never changed, so the entries
sharing one stay intact; a user who writes into a cached directory (which is the
cache's, read-only by contract) changes every entry that shares the file, and the next
transfer that checks it (every placed file is hashed) fetches it instead. How bytes
count against the budget is :mod:`dckpt.cluster._cache_budget`.

Hidden directories, what a cache starting on the folder trusts of the index and what
it removes are in :mod:`dckpt.cluster._cache_folder`.

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
import threading
import time
from collections.abc import Iterator

import dask.config
from dask.utils import format_bytes

from dckpt import _node, _transfer
from dckpt._locks import flocked
from dckpt.cluster._cache_budget import (
    MAX_BYTES_SETTING,
    MAX_BYTES_VARIABLE,
    choose_evictions,
    parse_budget,
)
from dckpt.cluster._cache_folder import (
    BOOKKEEPING_NAMES,
    LOCK_NAME,
    PINS_NAME,
    TRANSFERS_NAME,
    check_staging,
    is_real_directory,
    refuse_foreign,
    remove_all,
    set_aside,
    strays,
    transfer_lock_file,
    unusable_entries,
)
from dckpt.cluster._cache_index import (
    INDEX_NAME,
    CachedFile,
    CacheEntry,
    CheckpointId,
    IndexFile,
)
from dckpt.cluster._cache_names import (
    STAGING_TAG,
    checkpoint_key,
    entry_dirname,
    owned_sibling,
)
from dckpt.cluster._cache_pins import CachePins
from dckpt.cluster._cache_sharing import (
    SharedFiles,
    distinct_bytes,
    files_of,
    offer,
    with_room,
)

# Re-exported for the modules and tests that know them from here: the names of the
# folder, the setting of the budget.
__all__ = ["BOOKKEEPING_NAMES", "INDEX_NAME", "MAX_BYTES_SETTING", "MAX_BYTES_VARIABLE",
           "CacheEntry", "CheckpointId", "NodeCache", "SharedFiles"]

logger = logging.getLogger(__name__)

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

    See :meth:`transfer_lock` for how a node adds a checkpoint once.
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
        self._lock_path = os.path.join(self.root, LOCK_NAME)
        self._transfers_dir = os.path.join(self.root, TRANSFERS_NAME)
        self._max_bytes = None if max_bytes is None else parse_budget(max_bytes, "max_bytes")
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()
        self._dirty = False
        self._evictions = 0
        os.makedirs(self.root, exist_ok=True)
        refuse_foreign(self.root)  # before writing anything into it
        with self._lock, flocked(self._lock_path) as lock_fd:
            self._pins = CachePins(os.path.join(self.root, PINS_NAME))
            os.makedirs(self._transfers_dir, exist_ok=True)
            try:
                trash = self._start_locked(lock_fd)
            finally:
                self._flush_locked(lock_fd)
        remove_all(trash)

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
        return parse_budget(dask.config.get(MAX_BYTES_SETTING), MAX_BYTES_SETTING)

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
        remove_all(trash)

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
                           if is_real_directory(e.path)]
                offered, pinned = offer(entries, manifest)
                for checkpoint_id in pinned:
                    self._pins.pin(checkpoint_id)
            new_bytes -= sum(e.size for e in manifest.files if e.hash in offered)

        def unpin() -> None:
            with self._lock:
                for checkpoint_id in pinned:
                    self._pins.unpin(checkpoint_id)

        return with_room(SharedFiles(offered, max(0, new_bytes), pinned, unpin), size,
                         self.reserve)

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
            if entry is not None and not is_real_directory(entry.path):
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
        remove_all(trash)
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
        with transfer_lock_file(self._transfers_dir, checkpoint_id):
            yield

    def staging_directory(self, checkpoint_id: CheckpointId) -> str:
        """A fresh, empty directory inside the cache folder to write a checkpoint into.

        Hand it to :meth:`add` when complete. If the transfer fails before that, the
        caller removes it (``shutil.rmtree``); a crash leaves it to the next cache to
        start on the folder once this process is gone: its name holds this pid.
        """
        staging = owned_sibling(self.root, checkpoint_id, STAGING_TAG)
        os.mkdir(staging)
        return staging

    def add(self, checkpoint_id: CheckpointId, digest: str, staging: str, size: int,
            manifest: _transfer.Manifest | None = None) -> str:
        """Move a complete checkpoint from ``staging`` into the cache.

        Room is made first (see :meth:`reserve`), then ``staging`` is renamed to its
        final directory and the index is written. Copies of ``checkpoint_id`` with
        another digest are stale and evicted, unless pinned. ``staging`` is the cache's
        from this call on: renamed into place, or removed when the checkpoint is cached
        already with this digest (another transfer, maybe of another process, won the
        race: its path is returned) and when adding fails (``CacheFullError``, an
        ``OSError``); only a ``staging`` refused up front (``ValueError``) is left alone.

        Parameters
        ----------
        checkpoint_id, digest
            What ``staging`` holds.
        staging
            A directory from :meth:`staging_directory`, filled, or a directory inside
            one (only that one is then renamed or removed; the staging one is the caller's).
        size
            Its size in bytes (the sum of its files), counted against the budget; files
            it shares with entries already cached (hard links, one inode) count once.
        manifest
            The one ``staging`` was checked against as it was written (a transfer's):
            the index takes its hashes (:func:`~dckpt.cluster._cache_sharing.files_of`).

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
        check_staging(self.root, staging)
        key = (checkpoint_id, digest)
        trash: list[str] = []
        placed = False
        try:
            files = files_of(staging, manifest)
            with self._shared():
                existing = self._entries.get(key)
                if existing is not None and is_real_directory(existing.path):
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
                    trash += set_aside(self.root, final)
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
            remove_all(trash)

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
        remove_all(trash)
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

    def _evict_locked(self, key: _Key) -> list[str]:
        """Forget an entry and rename its directory aside; returns what to delete."""
        entry = self._entries.pop(key)
        self._dirty = True
        self._evictions += 1
        logger.debug("evicted checkpoint %r (%d bytes)", entry.checkpoint_id, entry.size)
        return set_aside(self.root, entry.path)

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
        victims = choose_evictions(list(self._entries.values()), size, files, self.max_bytes,
                                   self._pins.live_keys, self.root)
        trash: list[str] = []
        for entry in victims:
            trash += self._evict_locked((entry.checkpoint_id, entry.digest))
        return trash

    def _reload_locked(self, lock_fd: int) -> None:
        """Replace ``_entries`` by the index on disk, or by none when it is unusable (it
        is then rewritten); flock held."""
        records = self._index.read_usable(lock_fd)
        self._dirty = records is None
        self._entries = collections.OrderedDict(
            ((record.checkpoint_id, record.digest), record) for record in records or ())

    def _flush_locked(self, lock_fd: int) -> None:
        # A failed write leaves the cache working; only a restart would forget the
        # newest entries (their directories are then removed as strays).
        if self._dirty and self._index.write_or_warn(lock_fd, list(self._entries.values())):
            self._dirty = False

    def _start_locked(self, lock_fd: int) -> list[str]:
        """Read the index and tidy the folder; returns what to delete. Flock held."""
        if os.path.lexists(self._index.path):
            self._reload_locked(lock_fd)
        else:
            self._dirty = True  # the index marks the folder as the cache's
        gone, changed = unusable_entries(self._entries)
        for key in gone:
            del self._entries[key]
        self._dirty = self._dirty or changed or bool(gone)
        trash: list[str] = []
        for name in strays(self.root, self._entries.values(), self._index.path):
            trash += set_aside(self.root, os.path.join(self.root, name))
        # A smaller budget than before a restart, or than the other processes': shrink
        # now. Pins of live processes are respected.
        trash += self._make_room_locked(0)
        return trash
