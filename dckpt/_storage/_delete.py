"""Deleting a checkpoint at a URI: commit marker first, then the files it lists.

Only files a dckpt marker lists are removed (or every file of a plain folder), one by
one, never with a recursive or glob ``fs.rm``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from dckpt._storage._folders import file_paths, remove_empty_folders
from dckpt._storage._parallel import remove_all
from dckpt._storage._protocol import (
    COMMIT_MARKER,
    PENDING_MARKER,
    files_of_pending,
    join,
    read_manifest_or_none,
)
from dckpt._storage._uri import resolve_uri, translated
from dckpt.errors import CheckpointNotFoundError

logger = logging.getLogger(__name__)


@translated("delete the checkpoint at", reading=True)
def delete(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove the checkpoint at ``uri``.

    The commit marker goes first, so that a crash midway leaves an incomplete
    checkpoint, never a complete-looking one with holes; then every file its manifest
    (wherever it stores them, see :mod:`._protocol`) or the pending marker of an
    unfinished upload lists, then the markers. Other files in the folder are left
    alone. A plain folder is removed as a whole.

    Files are removed one by one (in parallel), never with a recursive or glob
    ``fs.rm``: s3fs removes the *bucket* when asked to remove a bucket's root
    recursively, and fsspec expands ``[``, ``*`` and ``?`` in names as patterns.
    Folders left empty are removed where they exist on their own (``memory://``,
    local disks).

    Raises
    ------
    CheckpointNotFoundError
        Nothing at ``uri`` (a missing bucket too).
    StorageError
        The storage back-end failed (see :mod:`._uri`).
    """
    fs, root = resolve_uri(uri, storage_options)
    fs.invalidate_cache(root)
    commit_path, pending_path = join(root, COMMIT_MARKER), join(root, PENDING_MARKER)
    manifest = read_manifest_or_none(fs, root, uri)
    listed = set() if manifest is None else {manifest.stored(rel) for rel in manifest.files}
    has_pending = fs.exists(pending_path)
    if manifest is None and not has_pending:
        found = file_paths(fs, root)
        if not found:
            raise CheckpointNotFoundError(f"no checkpoint at {uri}: nothing is there")
        remove_all(fs, found)
        remove_empty_folders(fs, root)
        logger.debug("removed the %d files of the plain folder %s", len(found), uri)
        return
    if manifest is not None:
        fs.rm_file(commit_path)
    listed |= files_of_pending(fs, root, uri)
    remove_all(fs, [join(root, rel) for rel in sorted(listed)])
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(pending_path)
    remove_empty_folders(fs, root)
    logger.debug("removed %d files of the checkpoint at %s", len(listed), uri)
