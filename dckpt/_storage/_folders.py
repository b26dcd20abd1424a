"""What a folder at a URI holds, found by listing it (for plain folders and clean-up).

A committed checkpoint's files come from its manifest instead
(:func:`~dckpt._storage._protocol.read_marker`).
"""

from __future__ import annotations

import contextlib

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from dckpt._formats import safe_relpath
from dckpt._storage._protocol import is_reserved

# Filesystems where a folder exists apart from the files in it (and may be empty).
FOLDERS_OF_THEIR_OWN = (LocalFileSystem, MemoryFileSystem)


def listing(
    fs: fsspec.AbstractFileSystem, root: str, uri: str
) -> tuple[dict[str, int], list[str]]:
    """Files and folders found below ``root``, markers left out, names checked."""
    prefix = root.rstrip("/") + "/"
    files: dict[str, int] = {}
    dirs: set[str] = set()
    # Files come from a listing without folders: with them, s3fs reports a key "a"
    # that is also the prefix of a key "a/b" as a folder only, and the file is lost.
    for name, info in fs.find(root, detail=True).items():
        if not name.startswith(prefix):
            continue  # the folder itself, or an object named like it
        rel = name[len(prefix):]
        if is_reserved(rel.rstrip("/")):
            continue
        if rel.endswith("/"):
            # A folder marker object ("d/", as the S3 console makes them): a folder.
            dirs.add(safe_relpath(rel))
        else:
            files[safe_relpath(rel)] = int(info.get("size") or 0)
    if isinstance(fs, FOLDERS_OF_THEIR_OWN):
        # Empty folders exist only here; on object stores folders are implied by keys.
        for name, info in fs.find(root, withdirs=True, detail=True).items():
            if (info.get("type") == "directory" and name.startswith(prefix)
                    and not is_reserved(name[len(prefix):])):
                dirs.add(safe_relpath(name[len(prefix):]))
    return files, sorted(dirs)


def file_paths(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Full paths of the files below ``root``, markers included, names unchecked."""
    prefix = root.rstrip("/") + "/"
    return [name for name in fs.find(root) if name.startswith(prefix)]


def has_files(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether any file other than dckpt's (markers, staged versions) lies below ``root``."""
    prefix = root.rstrip("/") + "/"
    return any(not is_reserved(name[len(prefix):]) for name in file_paths(fs, root))


def fingerprint(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """A string that changes when a file below ``root`` is added, removed or rewritten:
    names, sizes and whatever the store says about the content or its age."""
    prefix = root.rstrip("/") + "/"
    entries = []
    for name, info in sorted(fs.find(root, detail=True).items()):
        if name.startswith(prefix) and not is_reserved(name[len(prefix):]):
            stamp = next((info[key] for key in ("ETag", "mtime", "LastModified", "created")
                          if info.get(key) is not None), None)
            entries.append((name[len(prefix):], info.get("size"), str(stamp)))
    return repr(entries)


def remove_empty_folders(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove the folders below ``root``, and ``root``, that hold nothing any more.

    Only where folders exist on their own; object stores have none to remove.
    """
    if not isinstance(fs, FOLDERS_OF_THEIR_OWN) or not fs.exists(root):
        return
    folders = [
        name for name, info in fs.find(root, withdirs=True, detail=True).items()
        if info.get("type") == "directory"
    ]
    for folder in sorted(set(folders) | {fs._strip_protocol(root)}, key=len, reverse=True):
        # OSError: not empty (someone else's files are left alone) or already gone.
        with contextlib.suppress(OSError):
            fs.rmdir(folder)
