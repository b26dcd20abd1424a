"""Put a directory in place all at once: build it in a sibling, then rename.

The sibling lives next to the target (never in the system temporary directory), so the
final step is a rename within one filesystem, not a copy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator


def partial_sibling(target: str, tag: str = "partial") -> str:
    """A fresh hidden name beside ``target``: ``.{name}.{uuid}.{tag}``."""
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.{tag}")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[str]:
    """Yield an empty directory to fill; on success it replaces ``target``.

    If ``target`` exists, its old contents are replaced as a whole: the old directory is
    renamed aside, the new one renamed in, and the old one removed. If the block raises,
    the partial directory is removed and ``target`` is left as it was.
    """
    target = os.path.abspath(os.fspath(target))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = partial_sibling(target)
    os.mkdir(staging)
    try:
        yield staging
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(new: str, target: str) -> None:
    try:
        # rename(2) replaces a missing target or an empty directory in one step.
        os.replace(new, target)
        return
    except OSError as e:
        if not os.path.lexists(target) or e.errno not in _NOT_EMPTY_ERRNOS:
            raise
    old = partial_sibling(target, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# What rename(2) says when the target is a directory that is not empty.
_NOT_EMPTY_ERRNOS = {errno.ENOTEMPTY, errno.EEXIST}
