"""Placing a file of a manifest from a local file with the same content, not the wire.

A receiver that holds a file with the content hash a manifest names (a node cache
holding the previous checkpoint of a run: frozen weights, a tokenizer) needs none of
its chunks. :func:`place_file` puts it in the tree being built:

- a hard link (``os.link``) when the local file is on the same filesystem and has the
  manifest's mode already, so that the two trees share one set of bytes on disk (and
  nothing may ``chmod`` it afterwards: that would change both);
- else a copy (``shutil.copyfile``, ``sendfile`` on Linux), given the manifest's mode.

Either way the placed file's bytes are then read and hashed: a file that changed
behind its owner's back (written in place, truncated, its mtime set back) does not
hash to what it promised and is not used; the caller fetches that file instead. See
:func:`dckpt._transfer.receive_directory` for why the bytes are read rather than a
remembered hash trusted.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable
from typing import TypeAlias

from dckpt._transfer._hashes import hash_file_now
from dckpt._transfer._manifest import FileEntry

__all__ = ["Have", "Placed", "place_file"]

logger = logging.getLogger(__name__)

Have: TypeAlias = Callable[[str], str | None]
"""Given a file's xxh3-128 hash (hex), the path of a local file with that content, or None."""

# A link that fails for these reasons can still be a copy; any other error (the local
# file gone, a full disk) is no reason to copy.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES,
                      errno.ENOTSUP, errno.EOPNOTSUPP})


class Placed(enum.Enum):
    """How a file was placed from a local copy."""

    LINKED = "linked"
    COPIED = "copied"


def place_file(local: str, path: str, entry: FileEntry) -> Placed | None:
    """Put the content of ``local`` at ``path`` (which must not exist) as ``entry`` says.

    Returns how, or None when ``local`` cannot stand for ``entry``: it is gone, not a
    regular file, of another size, or does not hash to ``entry.hash``; or it could be
    neither linked nor copied. Then nothing is left at ``path``, and the caller gets
    the file some other way. Errors of the disk being written (``ENOSPC``) are raised.
    """
    try:
        st = os.lstat(local)
    except OSError as e:
        logger.debug("not placing %r from %s: %s", entry.path, local, e)
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
        logger.debug("not placing %r from %s: not a regular file of %d bytes",
                     entry.path, local, entry.size)
        return None
    how = _link_or_copy(local, path, entry, st)
    if how is None:
        return None
    try:
        placed = os.lstat(path)
        ok = stat.S_ISREG(placed.st_mode) and placed.st_size == entry.size
        actual = hash_file_now(path) if ok else None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        logger.debug("not placing %r from %s: %s", entry.path, local, e)
        ok, actual = False, None
    if not ok or actual != entry.hash:
        logger.warning(
            "%s no longer holds the bytes of %r (hash %s, expected %s): it changed behind "
            "the back of whoever offered it; fetching that file instead",
            local, entry.path, actual, entry.hash,
        )
        os.unlink(path)
        return None
    return how  # its hash is remembered under the new ctime: a manifest reads nothing


def _link_or_copy(local: str, path: str, entry: FileEntry, st: os.stat_result) -> Placed | None:
    mode = entry.mode & 0o777
    if stat.S_IMODE(st.st_mode) & 0o777 == mode:
        try:
            os.link(local, path, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _NO_LINK:
                logger.debug("not placing %r from %s: %s", entry.path, local, e)
                return None
        else:
            return Placed.LINKED
    try:
        shutil.copyfile(local, path, follow_symlinks=False)
        os.chmod(path, mode)
    except OSError as e:
        if os.path.lexists(path):
            os.unlink(path)
        if e.errno == errno.ENOSPC:
            raise
        logger.debug("not placing %r from %s: %s", entry.path, local, e)
        return None
    return Placed.COPIED
