"""The node cache's byte budget: how bytes are counted, and what to evict for room.

The budget counts bytes on disk: ``used_bytes`` is the sum of the entries' sizes less
every file whose inode an entry listed already, so a file linked into two entries counts
once, and evicting either of them leaves the figure right, as the other still lists that
inode (nothing is re-attributed: the figure is computed from the entries that remain).
An entry's ``size`` stays the size of its checkpoint. Eviction frees what only the
evicted entry holds; making room evicts until the entries that remain, and the incoming
one, fit.

:func:`parse_budget` reads a budget (``max_bytes=`` or ``dckpt.cache.max-bytes``);
:func:`choose_evictions` picks the entries to evict for an incoming one, least recently
used first and never a pinned one, or raises :class:`~dckpt.errors.CacheFullError`
naming the setting to raise. It decides only: the cache calls it under its locks and
evicts what it names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dask.utils import format_bytes, parse_bytes

from dckpt.cluster._cache_index import CachedFile, CacheEntry, CheckpointId
from dckpt.cluster._cache_names import checkpoint_key
from dckpt.cluster._cache_sharing import distinct_bytes
from dckpt.errors import CacheFullError

__all__ = ["MAX_BYTES_SETTING", "MAX_BYTES_VARIABLE", "choose_evictions", "parse_budget"]

MAX_BYTES_SETTING = "dckpt.cache.max-bytes"
MAX_BYTES_VARIABLE = "DASK_DCKPT__CACHE__MAX_BYTES"


def choose_evictions(
    entries: Sequence[CacheEntry], size: int, files: tuple[CachedFile, ...], budget: int,
    pinned_keys: Callable[[], set[str]], root: str,
) -> list[CacheEntry]:
    """The entries to evict so that the others and an incoming one of ``size`` bytes
    (sharing the inodes of ``files`` with them) fit ``budget``.

    ``entries`` least recently used first; ``pinned_keys`` gives the
    :func:`~dckpt.cluster._cache_names.checkpoint_key` of every checkpoint pinned by a
    live process, asked only when something must go. ``root`` names the cache in the
    :class:`~dckpt.errors.CacheFullError` raised when even evicting every unpinned
    entry leaves no room.
    """
    incoming = CacheEntry(CheckpointId(""), "", size, "", 0.0, files=files)

    def used_with(entries: list[CacheEntry]) -> int:
        return distinct_bytes([*entries, incoming])

    remaining = list(entries)  # least recently used first
    if used_with(remaining) <= budget:
        return []
    pinned_ids = pinned_keys()
    kept = [e for e in remaining if checkpoint_key(e.checkpoint_id) in pinned_ids]
    pinned = distinct_bytes(kept)
    if distinct_bytes([incoming]) > budget:
        raise CacheFullError(
            f"a checkpoint of {size} bytes ({format_bytes(size)}) is larger than the "
            f"whole node cache at {root}, which may hold {budget} bytes "
            f"({format_bytes(budget)}); {pinned} bytes are pinned by checkpoints in "
            f"use. Raise `{MAX_BYTES_SETTING}` ({MAX_BYTES_VARIABLE}) on the workers."
        )
    if used_with(kept) > budget:
        raise CacheFullError(
            f"no room for {size} bytes ({format_bytes(size)}) in the node cache at "
            f"{root}: it may hold {budget} bytes ({format_bytes(budget)}) and "
            f"{pinned} bytes of it are pinned by checkpoints in use. Raise "
            f"`{MAX_BYTES_SETTING}` ({MAX_BYTES_VARIABLE}) on the workers, or release "
            "checkpoints sooner."
        )
    victims: list[CacheEntry] = []
    for entry in list(remaining):
        if used_with(remaining) <= budget:
            break
        if checkpoint_key(entry.checkpoint_id) in pinned_ids:
            continue
        remaining.remove(entry)
        victims.append(entry)
    assert used_with(remaining) <= budget, (used_with(remaining), size, budget)
    return victims


def parse_budget(value: object, name: str) -> int:
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
