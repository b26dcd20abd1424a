"""The node cache's index on disk, ``<root>/index.json``, shared by a node's processes.

The index lists what the cache folder holds; every process of the node that uses the
folder reads and writes it, each holding the folder's lock file (see
:class:`dckpt.cluster._cache.NodeCache`). :class:`IndexFile` reads it again only when
it changed since this process last read or wrote it. The check is cheap: a
*generation* number kept in the lock file, bumped by every write, together with the
index's inode, size and modification time. The generation alone would miss a write
whose process died before bumping it; the file's stat alone could, in principle, come
back the same for two writes within one clock tick (a freed inode reused, equal
sizes); together they cannot both miss.

Directory names in the index are single, plain path components, so a hostile index
can neither make the cache serve nor delete anything outside its folder.

Each entry may list its files (``"files"``: relative path, xxh3-128 content hash, size,
inode), which is what lets the cache share identical files between entries and count
them once (see :mod:`dckpt.cluster._cache`). The key is optional, so the format
version stays 1: an index written before it, or rewritten by a dckpt that does not
know it, has entries without files, which are counted by their size and offer no
file to share.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, NewType

from dckpt._formats import safe_relpath, write_file_atomically

__all__ = [
    "INDEX_NAME", "CacheEntry", "CachedFile", "CheckpointId", "CorruptIndexError", "IndexFile",
]

logger = logging.getLogger(__name__)

CheckpointId = NewType("CheckpointId", str)
"""The id of a checkpoint, unique across the cluster (free text)."""

INDEX_NAME = "index.json"
INDEX_FORMAT_VERSION = 1

# The generation at the start of the lock file: fixed width, so a rewrite needs no
# truncation and a reader never sees a mix of two numbers.
_GENERATION_WIDTH = 20

_Signature = tuple[int, int, int, int]  # (generation, inode, size, mtime_ns)
_FILE_HASH = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class CachedFile:
    """A regular file of a cached checkpoint, as it was when the entry was added.

    ``path`` is relative to the entry's directory (POSIX separators), ``hash`` its
    xxh3-128 content hash (hex), ``inode`` its inode in the cache folder's filesystem:
    two entries listing one inode share its bytes (a hard link).
    """

    path: str
    hash: str
    size: int
    inode: int


@dataclass
class CacheEntry:
    """One cached checkpoint.

    Attributes
    ----------
    checkpoint_id, digest
        What is cached: the checkpoint and the digest of its contents.
    size
        Its size in bytes: the sum of its files, whichever of them it shares with
        other entries (the budget counts shared files once, see ``files``).
    path
        The absolute path of its directory.
    last_used
        When it was added or last looked up by any process (``time.time()``).
    pins
        How many users of this :class:`~dckpt.cluster._cache.NodeCache` object hold
        it; pins of other processes are on disk and not counted here.
    files
        Its regular files (:class:`CachedFile`), or ``()`` when not known.
    """

    checkpoint_id: CheckpointId
    digest: str
    size: int
    path: str
    last_used: float
    pins: int = 0
    files: tuple[CachedFile, ...] = ()


class CorruptIndexError(ValueError):
    """The index file does not hold what this module writes."""


class IndexFile:
    """``index.json`` of one cache folder, as this process last saw it.

    Every method must be called with the folder's lock held; ``lock_fd`` is that lock
    file's descriptor, which also stores the generation.
    """

    path: str
    _root: str
    _seen: _Signature | None  # at this object's last read or write

    def __init__(self, root: str) -> None:
        self._root = root
        self.path = os.path.join(root, INDEX_NAME)
        self._seen = None

    def changed(self, lock_fd: int) -> bool:
        """Whether the index may differ from what this object last read or wrote."""
        return self._seen is None or self._signature(lock_fd) != self._seen

    def read(self, lock_fd: int) -> list[CacheEntry]:
        """The entries of the index, validated.

        Raises
        ------
        OSError, CorruptIndexError, RecursionError
            If the index cannot be read, or does not hold what :meth:`write` writes.
        """
        self._seen = self._signature(lock_fd)
        return _parse(self.path, self._root)

    def read_usable(self, lock_fd: int) -> list[CacheEntry] | None:
        """The entries of the index, least recently used first (as listed where equal);
        None, with a warning, when the index cannot be read or does not validate."""
        try:
            records = self.read(lock_fd)
        except (OSError, ValueError, RecursionError) as e:
            logger.warning(
                "the node cache index %s is unusable (%s); starting over with an empty "
                "index: the directories in %s become strays, removed by the next cache "
                "to start there", self.path, e, self._root,
            )
            return None
        return sorted(records, key=lambda r: r.last_used)  # stable: file order

    def write_or_warn(self, lock_fd: int, entries: list[CacheEntry]) -> bool:
        """:meth:`write`; False, with a warning, when it could not be written."""
        try:
            self.write(lock_fd, entries)
        except OSError as e:
            logger.warning("could not write the node cache index %s: %s", self.path, e)
            return False
        return True

    def write(self, lock_fd: int, entries: list[CacheEntry]) -> None:
        """Replace the index atomically by ``entries`` (in that order).

        Raises
        ------
        OSError
            If it could not be written; the index on disk is then as it was.
        """
        payload = {
            "format_version": INDEX_FORMAT_VERSION,
            "entries": [
                {
                    "checkpoint_id": entry.checkpoint_id,
                    "digest": entry.digest,
                    "size": entry.size,
                    "dirname": os.path.basename(entry.path),
                    "last_used": entry.last_used,
                    **({"files": [[f.path, f.hash, f.size, f.inode] for f in entry.files]}
                       if entry.files else {}),
                }
                for entry in entries
            ],
        }
        write_file_atomically(self.path, json.dumps(payload, indent=1).encode())
        generation = _read_generation(lock_fd) + 1
        os.pwrite(lock_fd, f"{generation:0{_GENERATION_WIDTH}d}\n".encode(), 0)
        self._seen = self._signature(lock_fd)

    def _signature(self, lock_fd: int) -> _Signature:
        try:
            st = os.stat(self.path)
        except OSError:
            return (_read_generation(lock_fd), -1, -1, -1)
        return (_read_generation(lock_fd), st.st_ino, st.st_size, st.st_mtime_ns)


def _check_dirname(dirname: object) -> str:
    """``dirname`` if it is a plain, single, non-hidden name; else CorruptIndexError."""
    if not isinstance(dirname, str):
        raise CorruptIndexError(f"dirname {dirname!r} is not a string")
    # safe_relpath refuses "..", absolute paths, backslashes and NUL; beyond that an
    # entry must be a single component that is neither hidden nor the index itself.
    if safe_relpath(dirname) != dirname or "/" in dirname:
        raise CorruptIndexError(f"dirname {dirname!r} is not a single plain name")
    if dirname.startswith(".") or dirname == INDEX_NAME:
        raise CorruptIndexError(f"dirname {dirname!r} is reserved")
    return dirname


def _read_generation(lock_fd: int) -> int:
    raw = os.pread(lock_fd, _GENERATION_WIDTH + 1, 0).strip()
    return int(raw) if raw.isdigit() else 0


def _parse(path: str, root: str) -> list[CacheEntry]:
    """The entries of the index at ``path``, validated; raises if it is not ours."""
    if os.path.islink(path) or not os.path.isfile(path):
        raise CorruptIndexError("it is not a regular file")
    with open(path, "rb") as f:
        data: Any = json.loads(f.read())
    version = data.get("format_version") if isinstance(data, dict) else None
    if type(version) is not int or version != INDEX_FORMAT_VERSION:
        raise CorruptIndexError(
            f"expected a JSON object with format_version {INDEX_FORMAT_VERSION}"
        )
    items = data.get("entries")
    if not isinstance(items, list):
        raise CorruptIndexError("'entries' is not a list")
    records: list[CacheEntry] = []
    seen_keys: set[tuple[str, str]] = set()
    seen_dirs: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise CorruptIndexError(f"entry {i} is not an object")
        checkpoint_id, digest = item.get("checkpoint_id"), item.get("digest")
        size, last_used = item.get("size"), item.get("last_used")
        if not isinstance(checkpoint_id, str) or not isinstance(digest, str):
            raise CorruptIndexError(f"entry {i}: checkpoint_id and digest must be strings")
        if type(size) is not int or size < 0:
            raise CorruptIndexError(f"entry {i}: size {size!r} is not a byte count")
        if not isinstance(last_used, (int, float)) or isinstance(last_used, bool) or (
            not math.isfinite(last_used)
        ):
            raise CorruptIndexError(f"entry {i}: last_used {last_used!r} is not a time")
        dirname = _check_dirname(item.get("dirname"))
        if (checkpoint_id, digest) in seen_keys or dirname in seen_dirs:
            raise CorruptIndexError(f"entry {i} repeats an earlier one")
        seen_keys.add((checkpoint_id, digest))
        seen_dirs.add(dirname)
        records.append(
            CacheEntry(
                CheckpointId(checkpoint_id), digest, size,
                os.path.join(root, dirname), float(last_used),
                files=_parse_files(item.get("files", []), i),
            )
        )
    return records


def _parse_files(value: object, i: int) -> tuple[CachedFile, ...]:
    """The ``files`` of entry ``i``, validated: paths stay inside the entry."""
    if not isinstance(value, list):
        raise CorruptIndexError(f"entry {i}: files is not a list")
    files = []
    for row in value:
        if not isinstance(row, list) or len(row) != 4:
            raise CorruptIndexError(f"entry {i}: a file is {row!r}, not [path, hash, size, inode]")
        path, file_hash, size, inode = row
        try:
            ok = isinstance(path, str) and safe_relpath(path) == path
        except ValueError:
            ok = False
        if not ok:
            raise CorruptIndexError(f"entry {i}: file path {path!r} is not a plain relative path")
        if not isinstance(file_hash, str) or not _FILE_HASH.fullmatch(file_hash):
            raise CorruptIndexError(f"entry {i}: file hash {file_hash!r} is not 32 hex digits")
        if type(size) is not int or size < 0 or type(inode) is not int or inode < 0:
            raise CorruptIndexError(f"entry {i}: file size {size!r} or inode {inode!r} is "
                                    "not a number >= 0")
        files.append(CachedFile(path, file_hash, size, inode))
    return tuple(files)
