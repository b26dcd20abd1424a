"""Walk a directory tree for packing or copying: what to store, and how, in a fixed order.

One policy for symlinks everywhere a checkpoint's tree is packed (``to_bytes``, the
dict form) or copied (``to_directory`` of a directory checkpoint), decided by
:func:`plan_tree` and independent of the process's working directory:

- a link whose relative target stays inside the tree (decided lexically, see
  :func:`~dckpt._formats._paths.symlink_stays_inside`) stays a link with the same
  target, dangling or not;
- any other link (absolute, or leading out) is followed and what it points to is
  stored, as ``shutil.copytree`` does by default and so Ray AIR; below a followed
  directory link every link is followed;
- a link leading out that dangles, sockets, FIFOs, devices and links back to a
  directory above them are skipped with a logged warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Callable

from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt._formats._paths import EntryKind, symlink_stays_inside

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


def copy_tree(
    source: str,
    target: str,
    *,
    exclude: Callable[[str], bool] | None = None,
    callback: Callback = DEFAULT_CALLBACK,
) -> None:
    """Copy the tree below ``source`` into ``target``, an existing empty directory.

    The copy holds what packing ``source`` and unpacking it would give (the module's
    symlink policy): links inside the tree stay links, with their relative targets.
    Files keep their mode and times (``shutil.copy2``); directories keep their mode,
    plus ``0o700`` so that they stay writable and removable, as unpacking does.
    ``exclude`` is called with each ``/``-separated path relative to ``source``.
    ``callback`` gets ``set_size(number of files)``, a branched child per file for
    its bytes, and ``relative_update(1)`` after each file.
    """
    plan = plan_tree(source, exclude)
    callback.set_size(sum(1 for kind, _, _ in plan if kind == "file"))
    for kind, relpath, value in plan:
        dest = os.path.join(target, *relpath.split("/"))
        if kind == "directory":
            assert isinstance(value, int)
            os.mkdir(dest)  # the plan lists every directory before what it holds
            os.chmod(dest, value | 0o700)
        elif kind == "symlink":
            assert isinstance(value, str)
            os.symlink(value, dest)
        else:
            assert isinstance(value, str)
            with callback.branched(value, dest) as child:
                shutil.copy2(value, dest)
                size = os.path.getsize(dest)
                child.set_size(size)
                child.relative_update(size)
            callback.relative_update(1)
