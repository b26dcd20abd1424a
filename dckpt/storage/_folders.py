"""What a folder at a URI holds, found by listing it (for plain folders and clean-up).

A committed checkpoint's files come from its manifest instead
(:func:`~dckpt.storage._protocol.read_marker`).
"""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from dckpt.formats._paths import safe_relpath
from dckpt.storage._protocol import MARKERS, join

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
        if rel.endswith("/"):
            # A folder marker object ("d/", as the S3 console makes them): a folder.
            dirs.add(safe_relpath(rel))
        elif (rel := safe_relpath(rel)) not in MARKERS:
            files[rel] = int(info.get("size") or 0)
    if isinstance(fs, FOLDERS_OF_THEIR_OWN):
        # Empty folders exist only here; on object stores folders are implied by keys.
        for name, info in fs.find(root, withdirs=True, detail=True).items():
            if info.get("type") == "directory" and name.startswith(prefix):
                dirs.add(safe_relpath(name[len(prefix):]))
    return files, sorted(dirs)


def file_paths(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Full paths of the files below ``root``, markers included, names unchecked."""
    prefix = root.rstrip("/") + "/"
    return [name for name in fs.find(root) if name.startswith(prefix)]


def has_files(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether any file other than the markers lies below ``root``."""
    markers = {join(root, name) for name in MARKERS}
    return any(name not in markers for name in file_paths(fs, root))
