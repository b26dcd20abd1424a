"""Walk a directory tree for packing: what to store, and how, in a fixed order."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable

from dckpt.formats._paths import EntryKind, symlink_stays_inside

logger = logging.getLogger(__name__)

Planned = tuple[EntryKind, str, str | int]
# A directory entry still to visit: path, relpath, dereferencing?, (dev, ino) above it.
_Pending = tuple[str, str, bool, frozenset[tuple[int, int]]]


def plan_tree(root: str, exclude: Callable[[str], bool] | None) -> list[Planned]:
    """``(kind, relpath, source path | mode | link target)`` below ``root``, in order.

    Depth-first with an explicit stack (deep trees would overflow recursion). The
    ``(st_dev, st_ino)`` of the directories above each entry detect cycles, which only
    dereferenced symlinks can create.
    """
    root_stat = os.stat(root)
    ancestors = frozenset({(root_stat.st_dev, root_stat.st_ino)})

    def children(
        directory: str, rel: str, deref: bool, above: frozenset[tuple[int, int]]
    ) -> list[_Pending]:
        names = sorted(os.listdir(directory), reverse=True)  # popped in sorted order
        return [
            (os.path.join(directory, name), f"{rel}/{name}" if rel else name, deref, above)
            for name in names
        ]

    plan: list[Planned] = []
    stack = children(root, "", False, ancestors)
    while stack:
        path, relpath, deref, above = stack.pop()
        if exclude is not None and exclude(relpath):
            continue
        st = os.lstat(path)
        is_link = stat.S_ISLNK(st.st_mode)
        if is_link:
            target = os.readlink(path)
            if not deref and symlink_stays_inside(relpath, target):
                plan.append(("symlink", relpath, target))
                continue
            try:
                st = os.stat(path)
            except OSError:
                logger.warning("skipping %s: dangling symlink to %r outside %s", path, target, root)
                continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in above:
                logger.warning("skipping %s: a symlink back to a directory above it", path)
                continue
            plan.append(("directory", relpath, st.st_mode & 0o777))
            stack.extend(children(path, relpath, deref or is_link, above | {key}))
        elif stat.S_ISREG(st.st_mode):
            plan.append(("file", relpath, path))
        else:
            logger.warning("skipping %s: not a regular file, directory or symlink", path)
    return plan


