"""Checks on relative paths that come from outside: archive entries, manifests, listings.

Every name that dckpt writes below a target directory passes through
:func:`safe_relpath` first, and every archive's entries through an
:class:`EntryIndex`, so that nothing lands outside that directory.
"""

from __future__ import annotations

import posixpath
from typing import Literal

from dckpt.errors import CheckpointFormatError, UnsafePathError

EntryKind = Literal["file", "directory", "symlink"]


def safe_relpath(path: str) -> str:
    """Return ``path`` as a normalized relative POSIX path, or raise.

    Refused with :class:`~dckpt.errors.UnsafePathError`: empty names, absolute paths,
    ``..`` components, backslashes (a Windows separator in disguise) and NUL bytes.
    """
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        raise UnsafePathError(f"refusing entry {path!r}: not a plain relative path")
    if path.startswith("/"):
        raise UnsafePathError(f"refusing entry {path!r}: absolute paths are not allowed")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts:
        raise UnsafePathError(f"refusing entry {path!r}: it names no file")
    if ".." in parts:
        raise UnsafePathError(
            f"refusing entry {path!r}: '..' would lead outside the target directory"
        )
    return "/".join(parts)


def symlink_stays_inside(link_relpath: str, target: str) -> bool:
    """Whether a symlink at ``link_relpath`` pointing to ``target`` stays in its tree.

    Decided lexically, which is exact only under two conditions that callers keep:
    no parent of the link is itself a symlink (:class:`EntryIndex` refuses entries
    below links), and every ``..`` of the target comes before any name. The second
    closes ``b -> .`` with ``a -> b/../x``, which is lexically inside but resolves
    through ``b`` to the parent of the tree; leading ``..`` only climb through the
    link's real parent directories, where lexical and physical agree.
    """
    if not target or target.startswith("/") or "\x00" in target:
        return False
    parts = [part for part in target.split("/") if part not in ("", ".")]
    climbs = 0
    while climbs < len(parts) and parts[climbs] == "..":
        climbs += 1
    if ".." in parts[climbs:]:
        return False
    parent = posixpath.dirname(link_relpath)
    resolved = posixpath.normpath(posixpath.join(parent, target))
    return resolved != ".." and not resolved.startswith("../") and resolved != "/"


class EntryIndex:
    """The paths of one archive so far; refuses what could not be unpacked safely.

    Refused whatever the order of entries: duplicates, links leaving the tree, entries
    below a file, and entries below a symlink (they would be written *through* the
    link: ``p -> .`` then ``p/q -> ..`` escapes).
    """

    _kinds: dict[str, EntryKind]
    _parents: set[str]

    def __init__(self) -> None:
        self._kinds = {}
        self._parents = set()

    def add(self, path: str, kind: EntryKind, target: str | None = None) -> None:
        if path in self._kinds:
            raise CheckpointFormatError(f"duplicate entry {path!r} in the archive")
        if kind == "symlink" and not symlink_stays_inside(path, target or ""):
            raise UnsafePathError(f"refusing symlink {path!r} -> {target!r}: it leads outside")
        if kind != "directory" and path in self._parents:
            error = UnsafePathError if kind == "symlink" else CheckpointFormatError
            raise error(f"refusing {kind} {path!r}: other entries lie below it")
        parts = path.split("/")
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        for parent in parents:
            if self._kinds.get(parent) == "symlink":
                raise UnsafePathError(f"refusing {path!r}: it lies below the symlink {parent!r}")
            if self._kinds.get(parent) == "file":
                raise CheckpointFormatError(f"refusing {path!r}: it lies below the file {parent!r}")
        self._kinds[path] = kind
        self._parents.update(parents)
