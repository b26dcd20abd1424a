"""Checkpoints at fsspec URIs: atomic upload with a commit marker, parallel download.

The protocol (markers, commit record, what readers accept) is described in
:mod:`dckpt._storage._protocol`, which also lists what a plain folder holds. Then one
private module per side:

- :mod:`._fs`: the fsspec filesystem for a URI; local paths; what back-end failures
  become (:class:`~dckpt.errors.StorageError`, ...); the thread pool for many calls.
- :mod:`._write`: :func:`upload_directory` (with the files it copies, server-side,
  from a checkpoint committed next to it instead of uploading them) and :func:`delete`.
- :mod:`._read`: :func:`uri_status`, :func:`uri_version`, :func:`list_files`,
  :func:`download_directory`, :func:`read_file`.
"""

from __future__ import annotations

from dckpt._storage._fs import is_local_uri, local_path_of, resolve_uri
from dckpt._storage._protocol import (
    COMMIT_MARKER,
    MARKERS,
    PENDING_MARKER,
    VERSIONS_FOLDER,
)
from dckpt._storage._read import (
    download_directory,
    list_files,
    read_file,
    uri_status,
    uri_version,
)
from dckpt._storage._write import delete, upload_directory

__all__ = [
    "COMMIT_MARKER",
    "MARKERS",
    "PENDING_MARKER",
    "VERSIONS_FOLDER",
    "delete",
    "download_directory",
    "is_local_uri",
    "list_files",
    "local_path_of",
    "read_file",
    "resolve_uri",
    "upload_directory",
    "uri_status",
    "uri_version",
]
