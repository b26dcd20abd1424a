"""Deleting a checkpoint at a URI: commit marker first, then the files it lists.

Only files a dckpt marker lists are removed (or every file of a plain folder), one by
one, never with a recursive or glob ``fs.rm``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import fsspec

from dckpt.errors import CheckpointNotFoundError
from dckpt.storage._folders import FOLDERS_OF_THEIR_OWN, file_paths
from dckpt.storage._parallel import remove_all
from dckpt.storage._protocol import (
    COMMIT_MARKER,
    PENDING_MARKER,
    files_of_pending,
    join,
    read_marker,
)
from dckpt.storage._uri import resolve_uri

logger = logging.getLogger(__name__)


def delete(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove the checkpoint at ``uri``.

    The commit marker goes first, so that a crash midway leaves an incomplete
    checkpoint, never a complete-looking one with holes; then every file its manifest
    (or the pending marker of an unfinished upload) lists, then the markers. Other
    files in the folder are left alone. A plain folder is removed as a whole.

    Files are removed one by one (in parallel), never with a recursive or glob
    ``fs.rm``: s3fs removes the *bucket* when asked to remove a bucket's root
    recursively, and fsspec expands ``[``, ``*`` and ``?`` in names as patterns.
    Folders left empty are removed where they exist on their own (``memory://``,
    local disks).

    Raises
    ------
    CheckpointNotFoundError
        Nothing at ``uri``.
    """
    fs, root = resolve_uri(uri, storage_options)
    fs.invalidate_cache(root)
    commit_path, pending_path = join(root, COMMIT_MARKER), join(root, PENDING_MARKER)
    try:
        listed = set(read_marker(fs, commit_path, uri)["files"])
        committed = True
    except FileNotFoundError:
        listed, committed = set(), False
    has_pending = fs.exists(pending_path)
    if not committed and not has_pending:
        found = file_paths(fs, root)
        if not found:
            raise CheckpointNotFoundError(f"no checkpoint at {uri}: nothing is there")
        remove_all(fs, found)
        _remove_empty_folders(fs, root)
        logger.debug("removed the %d files of the plain folder %s", len(found), uri)
        return
    if committed:
        fs.rm_file(commit_path)
    listed |= files_of_pending(fs, pending_path, uri)
    remove_all(fs, [join(root, rel) for rel in sorted(listed)])
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(pending_path)
    _remove_empty_folders(fs, root)
    logger.debug("removed %d files of the checkpoint at %s", len(listed), uri)


def _remove_empty_folders(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove the folders below ``root``, and ``root``, that hold nothing any more.

    Only where folders exist on their own; object stores have none to remove.
    """
    if not isinstance(fs, FOLDERS_OF_THEIR_OWN):
        return
    folders = [
        name for name, info in fs.find(root, withdirs=True, detail=True).items()
        if info.get("type") == "directory"
    ]
    for folder in sorted(set(folders) | {fs._strip_protocol(root)}, key=len, reverse=True):
        # OSError: not empty (someone else's files are left alone) or already gone.
        with contextlib.suppress(OSError):
            fs.rmdir(folder)
