"""Checks on relative paths that come from outside: archive entries, manifests, listings.

Every name that dckpt writes below a target directory passes through
:func:`safe_relpath` first, so that nothing lands outside that directory.
"""

from __future__ import annotations

import posixpath

from dckpt.errors import UnsafePathError


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

    Decided lexically, which is exact only when no parent of the link is itself a
    symlink; callers refuse links below links (see ``_packing.unpack_to_directory``).
    """
    if not target or target.startswith("/") or "\x00" in target:
        return False
    parent = posixpath.dirname(link_relpath)
    resolved = posixpath.normpath(posixpath.join(parent, target))
    return resolved != ".." and not resolved.startswith("../") and resolved != "/"
