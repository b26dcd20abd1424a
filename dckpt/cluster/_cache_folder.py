"""The node cache's folder itself: its bookkeeping files and its housekeeping.

Hidden directories name the process that made them: ``.{name}.{pid}.{token}.partial``
for staging, ``.{name}.{pid}.{token}.evicted`` for directories set aside to delete (see
:mod:`dckpt.cluster._cache_names`). On start, the index is trusted only as far as it
checks out: entries whose directory is gone are dropped; hidden leftovers of processes
that are gone (a crash) are removed, those of live processes are theirs to finish;
anything else that no entry names is removed; an index that cannot be read or does not
validate is logged and rebuilt empty. Entries that other processes added are kept,
whatever this one knew of them.

This module holds the folder's side of that: the names of its bookkeeping files
(``.lock``, ``.pins/``, ``.transfers/``), :func:`refuse_foreign` (a folder that holds
files but no index is no cache's), :func:`unusable_entries` and :func:`strays` (what a
cache starting on the folder drops and removes), :func:`check_staging`,
:func:`transfer_lock_file` (a node-wide lock per checkpoint), and :func:`set_aside` and
:func:`remove_all`, with which the cache renames what goes under its locks and deletes
it after them. The index itself is :mod:`dckpt.cluster._cache_index`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

from dckpt._locks import flocked
from dckpt.cluster._cache_index import INDEX_NAME, CacheEntry, CheckpointId
from dckpt.cluster._cache_names import (
    STAGING_TAG,
    TRASH_TAG,
    checkpoint_key,
    is_leftover,
    owned_sibling,
    owner_is_alive,
)
from dckpt.cluster._cache_sharing import check_files

__all__ = [
    "BOOKKEEPING_NAMES",
    "LOCK_NAME",
    "PINS_NAME",
    "TRANSFERS_NAME",
    "check_staging",
    "is_real_directory",
    "refuse_foreign",
    "remove_all",
    "set_aside",
    "strays",
    "transfer_lock_file",
    "unusable_entries",
]

logger = logging.getLogger(__name__)

K = TypeVar("K")

# The folder's bookkeeping, shared by its processes (see dckpt.cluster._cache).
LOCK_NAME = ".lock"
PINS_NAME = ".pins"
TRANSFERS_NAME = ".transfers"
BOOKKEEPING_NAMES = frozenset({LOCK_NAME, PINS_NAME, TRANSFERS_NAME})


def refuse_foreign(root: str) -> None:
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


def unusable_entries(entries: Mapping[K, CacheEntry]) -> tuple[list[K], bool]:
    """At start: the keys of ``entries`` whose directory is gone, to drop, and whether
    an entry's file list was dropped because its files are not those it lists (the
    entry is then counted by its size and shares none of them)."""
    gone: list[K] = []
    changed = False
    for key, entry in entries.items():
        if not is_real_directory(entry.path):
            logger.info(
                "dropping checkpoint %r from the node cache: %s is gone",
                entry.checkpoint_id, entry.path,
            )
            gone.append(key)
        elif entry.files and not check_files(entry):
            logger.info("the files of cached checkpoint %r at %s are not those the index "
                        "lists; counting it by its size, sharing none of them",
                        entry.checkpoint_id, entry.path)
            entry.files = ()
            changed = True
    return gone, changed


def strays(root: str, entries: Iterable[CacheEntry], index_path: str) -> list[str]:
    """At start: the names in ``root`` to remove. What no entry names, but the
    bookkeeping, a usable index (rewritten by the cache when it was unusable) and the
    leftovers of live processes (their staging or trash: they finish it)."""
    keep = {os.path.basename(entry.path) for entry in entries}
    keep |= BOOKKEEPING_NAMES
    if os.path.isfile(index_path) and not os.path.islink(index_path):
        keep.add(INDEX_NAME)
    out: list[str] = []
    for name in os.listdir(root):
        if name in keep:
            continue
        if is_leftover(name):
            if owner_is_alive(name):
                continue
        else:
            logger.info("removing %s from the node cache: no index entry names it", name)
        out.append(name)
    return out


def set_aside(root: str, path: str) -> list[str]:
    """Rename ``path`` to a trash name of this process; returns what to delete.

    Under the cache's flock, so that exactly one process deletes it, after the locks.
    """
    aside = owned_sibling(root, os.path.basename(path), TRASH_TAG)
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return []
    except OSError as e:
        logger.warning("could not remove %s from the node cache: %s", path, e)
        return []
    return [aside]


@contextlib.contextmanager
def transfer_lock_file(transfers_dir: str, checkpoint_id: CheckpointId) -> Iterator[None]:
    """Hold the ``flock`` of ``checkpoint_id``'s lock file in ``transfers_dir``
    (:meth:`NodeCache.transfer_lock <dckpt.cluster._cache.NodeCache.transfer_lock>`)."""
    os.makedirs(transfers_dir, exist_ok=True)
    lock_path = os.path.join(transfers_dir, f"{checkpoint_key(checkpoint_id)}.lock")
    with flocked(lock_path):
        try:
            yield
        finally:
            # Unlinked while held (flocked allows it): waiters move on to a fresh
            # file, and no lock file per checkpoint ever fetched piles up.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)


def check_staging(root: str, staging: str) -> None:
    """Refuse ``staging`` unless it is a staging directory of the cache at ``root``, or a
    directory inside one (a transfer may build its result there and rename it once
    complete)."""
    rel = os.path.relpath(staging, root)
    first = rel.split(os.sep, 1)[0]
    real_root = os.path.realpath(root)
    if (
        rel.startswith("..")
        or not (first.startswith(".") and first.endswith(f".{STAGING_TAG}"))
        or not os.path.realpath(staging).startswith(real_root + os.sep)
    ):
        raise ValueError(
            f"{staging!r} is not (inside) a staging directory of the node cache at "
            f"{root}; get one from NodeCache.staging_directory()"
        )
    if not is_real_directory(staging):
        raise FileNotFoundError(f"the staging directory {staging!r} does not exist")


def is_real_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def remove_all(paths: Iterable[str]) -> None:
    """Delete files and directories; never follows a symbolic link out."""
    for path in paths:
        try:
            if is_real_directory(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("could not remove %s: %s", path, e)
