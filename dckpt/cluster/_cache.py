"""The node cache: checkpoints copied to this node, kept within a byte budget.

A :class:`NodeCache` owns one folder on the node's local disk (by default
:func:`dckpt.node.cache_directory`). Checkpoints streamed from other nodes, or
downloaded from URIs, are written into a *staging* directory inside that folder and
then renamed into place, so a reader never sees half a checkpoint and the rename never
crosses filesystems. The cache keeps

- a byte budget (``dckpt.cache.max-bytes``, read at the point of use), enforced by
  evicting the least recently used checkpoints first;
- pins: a checkpoint in use is never evicted (pins live in memory only: a restarted
  worker has no users);
- an index on disk, ``<root>/index.json``, so a restarted worker finds what is there.

On start the index is trusted only as far as it checks out: entries whose directory
is gone are dropped, anything in the folder that no entry names (staging directories
left by a crash, evicted directories not yet deleted, strays) is removed, and an index
that cannot be read or does not validate is logged and rebuilt empty. Directory names
in the index are single, plain path components, so a hostile index can neither make
the cache serve nor delete anything outside its folder.

Threads: every public method takes one lock and may be called from any thread. Slow
deletions (``rmtree`` of an evicted checkpoint, a staging directory that lost a race)
happen after the lock is released: under the lock a directory is only renamed aside.
Methods still do blocking disk I/O in the calling thread (a small index write, and
those deletions), so event-loop code should call them through a thread
(``asyncio.to_thread``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NewType

import dask.config
from dask.utils import format_bytes, parse_bytes

from dckpt import node
from dckpt.errors import CacheFullError
from dckpt.formats._atomic import partial_sibling
from dckpt.formats._layout import write_file_atomically
from dckpt.formats._paths import safe_relpath

__all__ = ["CacheEntry", "CheckpointId", "NodeCache"]

logger = logging.getLogger(__name__)

CheckpointId = NewType("CheckpointId", str)
"""The id of a checkpoint, unique across the cluster (free text)."""

INDEX_NAME = "index.json"
INDEX_FORMAT_VERSION = 1
MAX_BYTES_SETTING = "dckpt.cache.max-bytes"
MAX_BYTES_VARIABLE = "DASK_DCKPT__CACHE__MAX_BYTES"

# Hidden siblings (see dckpt.formats._atomic.partial_sibling): directories being
# written, and directories evicted but not yet deleted. Never entries of the index.
_STAGING_TAG = "partial"
_TRASH_TAG = "evicted"
_LEFTOVER_SUFFIXES = (f".{_STAGING_TAG}", f".{_TRASH_TAG}")

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]")
_READABLE_ID_CHARS = 40

_Key = tuple[CheckpointId, str]  # (checkpoint id, digest)


@dataclass
class CacheEntry:
    """One cached checkpoint.

    Attributes
    ----------
    checkpoint_id, digest
        What is cached: the checkpoint and the digest of its contents.
    size
        Its size in bytes, as counted against the budget.
    path
        The absolute path of its directory.
    last_used
        When it was added or last looked up (``time.time()``).
    pins
        How many users hold it; in memory only, never persisted.
    """

    checkpoint_id: CheckpointId
    digest: str
    size: int
    path: str
    last_used: float
    pins: int = 0


class _CorruptIndexError(ValueError):
    """The index file does not hold what this module writes."""


class NodeCache:
    """The cache of checkpoints copied to this node; thread-safe.

    Parameters
    ----------
    root
        The folder the cache owns; created if needed. Defaults to
        :func:`dckpt.node.cache_directory`. A folder that is not empty and holds no
        cache index is refused: the cache removes whatever it does not know about.
    max_bytes
        The byte budget, an int or a string such as ``"10GiB"``. Defaults to the
        setting ``dckpt.cache.max-bytes``, read each time it is needed.

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
    _index_path: str
    _max_bytes: int | None
    _lock: threading.Lock
    _entries: collections.OrderedDict[_Key, CacheEntry]  # least recently used first
    _pins: dict[CheckpointId, int]
    _dirty: bool  # the index on disk is behind _entries
    _hits: int
    _misses: int
    _evictions: int

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        max_bytes: int | str | None = None,
    ) -> None:
        self.root = (
            os.path.abspath(os.fspath(root)) if root is not None else node.cache_directory()
        )
        self._index_path = os.path.join(self.root, INDEX_NAME)
        self._max_bytes = None if max_bytes is None else _parse_budget(max_bytes, "max_bytes")
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()
        self._pins = {}
        self._dirty = False
        self._hits = self._misses = self._evictions = 0
        os.makedirs(self.root, exist_ok=True)
        with self._lock:
            trash = self._load_locked()
        _remove_all(trash)
        with self._lock:
            self._flush_locked()

    def __repr__(self) -> str:
        with self._lock:
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
        """The bytes of every cached checkpoint, pinned or not."""
        with self._lock:
            return self._used_locked()

    def reserve(self, size: int) -> None:
        """Make room for ``size`` more bytes, evicting least recently used first.

        Pinned checkpoints are never evicted. Nothing is held for the caller: the room
        may be taken by another :meth:`add` before this caller's (which makes room
        again). Call it before a transfer to fail early.

        Raises
        ------
        CacheFullError
            If ``size`` does not fit even with every unpinned checkpoint evicted
            (then nothing is evicted), including when ``size`` alone exceeds the budget.
        ValueError
            If ``size`` is negative.
        """
        with self._lock:
            try:
                trash = self._make_room_locked(size)
            finally:
                self._flush_locked()
        _remove_all(trash)

    # -- lookup and pins --------------------------------------------------------------

    def lookup(self, checkpoint_id: CheckpointId, digest: str) -> str | None:
        """The directory of ``checkpoint_id`` if it is cached with ``digest``.

        A hit makes the entry the most recently used. Copies of the same checkpoint
        with another digest are stale and are evicted, hit or miss, unless the
        checkpoint is pinned (its users keep them; they go at the next lookup or
        :meth:`add` after the last pin is released, or as the least recently used).

        Returns
        -------
        str or None
            The absolute path, or None (a miss).
        """
        key = (checkpoint_id, digest)
        trash: list[str] = []
        path: str | None = None
        with self._lock:
            try:
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
                if entry is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    self._touch_locked(key)
                    path = entry.path
            finally:
                self._flush_locked()
        _remove_all(trash)
        return path

    def pin(self, checkpoint_id: CheckpointId) -> None:
        """Keep ``checkpoint_id`` from eviction until a matching :meth:`unpin`.

        Pins count, and may be taken before the checkpoint is cached: a user that pins
        first, then looks up or adds, cannot lose the directory in between.
        """
        with self._lock:
            self._pins[checkpoint_id] = self._pins.get(checkpoint_id, 0) + 1

    def unpin(self, checkpoint_id: CheckpointId) -> None:
        """Release one pin of ``checkpoint_id``.

        Raises
        ------
        ValueError
            If ``checkpoint_id`` is not pinned.
        """
        with self._lock:
            count = self._pins.get(checkpoint_id, 0)
            if count <= 0:
                raise ValueError(f"checkpoint {checkpoint_id!r} is not pinned in {self.root}")
            if count == 1:
                del self._pins[checkpoint_id]
            else:
                self._pins[checkpoint_id] = count - 1

    @contextlib.contextmanager
    def pinned(self, checkpoint_id: CheckpointId) -> Iterator[None]:
        """Pin ``checkpoint_id`` for the duration of a ``with`` block."""
        self.pin(checkpoint_id)
        try:
            yield
        finally:
            self.unpin(checkpoint_id)

    # -- adding -----------------------------------------------------------------------

    def staging_directory(self, checkpoint_id: CheckpointId) -> str:
        """A fresh, empty directory inside the cache folder to write a checkpoint into.

        Hand it to :meth:`add` when complete. If the transfer fails before that, the
        caller removes it (``shutil.rmtree``); a crash leaves it to the next start,
        which removes it.
        """
        staging = partial_sibling(os.path.join(self.root, _readable(checkpoint_id)), _STAGING_TAG)
        os.mkdir(staging)
        return staging

    def add(self, checkpoint_id: CheckpointId, digest: str, staging: str, size: int) -> str:
        """Move a complete checkpoint from ``staging`` into the cache.

        Room is made first (see :meth:`reserve`), then ``staging`` is renamed to its
        final directory and the index is written. Copies of ``checkpoint_id`` with
        another digest are stale and evicted, unless pinned.

        ``staging`` belongs to the cache from this call on: it is renamed into place,
        or removed — when the checkpoint is already cached with the same digest
        (another transfer won the race; its path is returned) and when adding fails
        (``CacheFullError``, an ``OSError``). Only a ``staging`` refused up front
        (``ValueError``) is left alone.

        Parameters
        ----------
        checkpoint_id, digest
            What ``staging`` holds.
        staging
            A directory from :meth:`staging_directory`, filled, or a directory inside
            one (then only that inner directory is renamed or removed; the staging
            directory around it stays the caller's to remove).
        size
            Its size in bytes, counted against the budget.

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
            with self._lock:
                try:
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
                    trash += self._make_room_locked(size)
                    final = os.path.join(self.root, _dirname(checkpoint_id, digest))
                    if os.path.lexists(final):
                        # No entry names it (checked above): a leftover. Move it aside.
                        aside = partial_sibling(final, _TRASH_TAG)
                        os.replace(final, aside)
                        trash.append(aside)
                    os.replace(staging, final)
                    placed = True
                    self._entries[key] = CacheEntry(
                        checkpoint_id, digest, size, final, last_used=self._now_locked()
                    )
                    self._dirty = True
                    logger.debug("cached checkpoint %r (%d bytes) at %s", checkpoint_id, size, final)
                    return final
                finally:
                    self._flush_locked()
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
            True if something was evicted; False if it is pinned or not cached.
        """
        trash: list[str] = []
        with self._lock:
            try:
                if self._pins.get(checkpoint_id):
                    return False
                keys = [key for key in self._entries if key[0] == checkpoint_id]
                for key in keys:
                    trash += self._evict_locked(key)
            finally:
                self._flush_locked()
        _remove_all(trash)
        return bool(keys)

    def entries(self) -> list[CacheEntry]:
        """Copies of the entries, least recently used first (most recently used last)."""
        with self._lock:
            return [
                dataclasses.replace(entry, pins=self._pins.get(entry.checkpoint_id, 0))
                for entry in self._entries.values()
            ]

    def stats(self) -> dict[str, int]:
        """Counters since this cache was created.

        Returns
        -------
        dict
            ``bytes_cached`` and ``entries`` (now), ``hits`` and ``misses`` (of
            :meth:`lookup`), ``evictions`` (checkpoints removed for room, as stale or
            by :meth:`evict`) and ``pinned`` (entries pinned now).
        """
        with self._lock:
            return {
                "bytes_cached": self._used_locked(),
                "entries": len(self._entries),
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "pinned": sum(1 for key in self._entries if self._pins.get(key[0])),
            }

    # -- internals (callers hold self._lock) ------------------------------------------

    def _used_locked(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def _now_locked(self) -> float:
        # Never older than the most recent entry, so that last_used follows the LRU
        # order even when the clock steps back; a restart sorts by it.
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
        aside = partial_sibling(entry.path, _TRASH_TAG)
        try:
            os.replace(entry.path, aside)
        except FileNotFoundError:
            return []
        except OSError as e:
            logger.warning("could not remove the evicted checkpoint at %s: %s", entry.path, e)
            return []
        logger.debug("evicted checkpoint %r (%d bytes)", entry.checkpoint_id, entry.size)
        return [aside]

    def _evict_stale_locked(self, checkpoint_id: CheckpointId, digest: str) -> list[str]:
        if self._pins.get(checkpoint_id):
            return []
        trash: list[str] = []
        for key in [k for k in self._entries if k[0] == checkpoint_id and k[1] != digest]:
            logger.info("evicting checkpoint %r: digest %s is stale", checkpoint_id, key[1])
            trash += self._evict_locked(key)
        return trash

    def _make_room_locked(self, size: int) -> list[str]:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a number of bytes >= 0, not {size!r}")
        budget = self.max_bytes
        used = self._used_locked()
        if used + size <= budget:
            return []
        pinned = sum(e.size for e in self._entries.values() if self._pins.get(e.checkpoint_id))
        if size > budget:
            raise CacheFullError(
                f"a checkpoint of {size} bytes ({format_bytes(size)}) is larger than the "
                f"whole node cache at {self.root}, which may hold {budget} bytes "
                f"({format_bytes(budget)}); {pinned} bytes are pinned by checkpoints in "
                f"use. Raise `{MAX_BYTES_SETTING}` ({MAX_BYTES_VARIABLE}) on the workers."
            )
        if pinned + size > budget:
            raise CacheFullError(
                f"no room for {size} bytes ({format_bytes(size)}) in the node cache at "
                f"{self.root}: it may hold {budget} bytes ({format_bytes(budget)}) and "
                f"{pinned} bytes of it are pinned by checkpoints in use. Raise "
                f"`{MAX_BYTES_SETTING}` ({MAX_BYTES_VARIABLE}) on the workers, or release "
                "checkpoints sooner."
            )
        trash: list[str] = []
        for key in list(self._entries):  # least recently used first
            if used + size <= budget:
                break
            entry = self._entries[key]
            if self._pins.get(entry.checkpoint_id):
                continue
            used -= entry.size
            trash += self._evict_locked(key)
        assert used + size <= budget, (used, size, budget)
        return trash

    def _flush_locked(self) -> None:
        if not self._dirty:
            return
        payload = {
            "format_version": INDEX_FORMAT_VERSION,
            "entries": [
                {
                    "checkpoint_id": entry.checkpoint_id,
                    "digest": entry.digest,
                    "size": entry.size,
                    "dirname": os.path.basename(entry.path),
                    "last_used": entry.last_used,
                }
                for entry in self._entries.values()
            ],
        }
        try:
            write_file_atomically(self._index_path, json.dumps(payload, indent=1).encode())
        except OSError as e:
            # The cache still works; only a restart would forget the newest entries
            # (their directories are then removed as strays).
            logger.warning("could not write the node cache index %s: %s", self._index_path, e)
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
            or not (first.startswith(".") and first.endswith(f".{_STAGING_TAG}"))
            or not os.path.realpath(staging).startswith(real_root + os.sep)
        ):
            raise ValueError(
                f"{staging!r} is not (inside) a staging directory of the node cache at "
                f"{self.root}; get one from NodeCache.staging_directory()"
            )
        if not _is_real_directory(staging):
            raise FileNotFoundError(f"the staging directory {staging!r} does not exist")

    def _load_locked(self) -> list[str]:
        """Read the index and tidy the folder; returns what to delete."""
        names = os.listdir(self.root)
        if not os.path.lexists(self._index_path):
            foreign = sorted(name for name in names if not _is_leftover(name))
            if foreign:
                raise ValueError(
                    f"{self.root} is not empty ({', '.join(foreign[:5])}) and holds no "
                    f"{INDEX_NAME}: it is not a dckpt node cache, and the cache removes "
                    "what it does not know. Give the cache a folder of its own "
                    "(see `dckpt.node-root`)."
                )
            records: list[CacheEntry] = []
            self._dirty = True  # the index marks the folder as the cache's
        else:
            try:
                records = _read_index(self._index_path, self.root)
            except (OSError, ValueError, RecursionError) as e:
                logger.warning(
                    "the node cache index %s is unusable (%s); starting with an empty "
                    "cache and removing the directories in %s",
                    self._index_path, e, self.root,
                )
                records = []
                self._dirty = True
        for record in sorted(records, key=lambda r: r.last_used):  # stable: file order
            if not _is_real_directory(record.path):
                logger.info(
                    "dropping checkpoint %r from the node cache: %s is gone",
                    record.checkpoint_id, record.path,
                )
                self._dirty = True
                continue
            self._entries[(record.checkpoint_id, record.digest)] = record
        keep = {os.path.basename(entry.path) for entry in self._entries.values()}
        if os.path.isfile(self._index_path) and not os.path.islink(self._index_path):
            keep.add(INDEX_NAME)  # rewritten by the first flush when it was unusable
        trash = [os.path.join(self.root, name) for name in names if name not in keep]
        for path in trash:
            if not _is_leftover(os.path.basename(path)):
                logger.info("removing %s from the node cache: no index entry names it", path)
        # A smaller budget than before the restart: shrink now (nothing is pinned yet).
        trash += self._make_room_locked(0)
        return trash


# -- helpers --------------------------------------------------------------------------


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


def _readable(checkpoint_id: str) -> str:
    return _UNSAFE_CHARACTERS.sub("_", checkpoint_id[:_READABLE_ID_CHARS]) or "checkpoint"


def _dirname(checkpoint_id: str, digest: str) -> str:
    """``<id, sanitized>-<digest[:12], sanitized>-<hash of both>``: one plain component.

    The sanitized parts are for people reading a listing; the hash keeps ids that
    sanitize alike (``a/b``, ``a:b``) and digests that share a prefix apart.
    """
    digest_part = _UNSAFE_CHARACTERS.sub("_", digest[:12]) or "none"
    both = f"{checkpoint_id}\x00{digest}".encode("utf-8", "surrogatepass")
    tag = hashlib.sha1(both, usedforsecurity=False).hexdigest()[:16]
    return f"{_readable(checkpoint_id)}-{digest_part}-{tag}"


def _is_leftover(name: str) -> bool:
    return name.startswith(".") and name.endswith(_LEFTOVER_SUFFIXES)


def _is_real_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _check_dirname(dirname: object) -> str:
    if not isinstance(dirname, str):
        raise _CorruptIndexError(f"dirname {dirname!r} is not a string")
    # safe_relpath refuses "..", absolute paths, backslashes and NUL; beyond that an
    # entry must be a single component that is neither hidden nor the index itself.
    if safe_relpath(dirname) != dirname or "/" in dirname:
        raise _CorruptIndexError(f"dirname {dirname!r} is not a single plain name")
    if dirname.startswith(".") or dirname == INDEX_NAME:
        raise _CorruptIndexError(f"dirname {dirname!r} is reserved")
    return dirname


def _read_index(path: str, root: str) -> list[CacheEntry]:
    """The entries of the index at ``path``, validated; raises if it is not ours."""
    if os.path.islink(path) or not os.path.isfile(path):
        raise _CorruptIndexError("it is not a regular file")
    with open(path, "rb") as f:
        data: Any = json.loads(f.read())
    version = data.get("format_version") if isinstance(data, dict) else None
    if type(version) is not int or version != INDEX_FORMAT_VERSION:
        raise _CorruptIndexError(
            f"expected a JSON object with format_version {INDEX_FORMAT_VERSION}"
        )
    items = data.get("entries")
    if not isinstance(items, list):
        raise _CorruptIndexError("'entries' is not a list")
    records: list[CacheEntry] = []
    seen_keys: set[tuple[str, str]] = set()
    seen_dirs: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _CorruptIndexError(f"entry {i} is not an object")
        checkpoint_id, digest = item.get("checkpoint_id"), item.get("digest")
        size, last_used = item.get("size"), item.get("last_used")
        if not isinstance(checkpoint_id, str) or not isinstance(digest, str):
            raise _CorruptIndexError(f"entry {i}: checkpoint_id and digest must be strings")
        if type(size) is not int or size < 0:
            raise _CorruptIndexError(f"entry {i}: size {size!r} is not a byte count")
        if not isinstance(last_used, (int, float)) or isinstance(last_used, bool) or (
            not math.isfinite(last_used)
        ):
            raise _CorruptIndexError(f"entry {i}: last_used {last_used!r} is not a time")
        dirname = _check_dirname(item.get("dirname"))
        if (checkpoint_id, digest) in seen_keys or dirname in seen_dirs:
            raise _CorruptIndexError(f"entry {i} repeats an earlier one")
        seen_keys.add((checkpoint_id, digest))
        seen_dirs.add(dirname)
        records.append(
            CacheEntry(
                CheckpointId(checkpoint_id), digest, size,
                os.path.join(root, dirname), float(last_used),
            )
        )
    return records


def _remove_all(paths: list[str]) -> None:
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
