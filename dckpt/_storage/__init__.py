"""Checkpoints at fsspec URIs: atomic upload with a commit marker, parallel download.

The protocol (markers, manifest, what readers accept) is described in
:mod:`dckpt._storage._protocol`. One private module per job:

- :mod:`._uri`: the fsspec filesystem for a URI; local paths; what back-end failures
  become (:class:`~dckpt.errors.StorageError`, ...).
- :mod:`._upload`: :func:`upload_directory`; :mod:`._reuse`: the files it copies,
  server-side, from a checkpoint committed next to it instead of uploading them.
- :mod:`._read`: :func:`uri_status`, :func:`uri_version`, :func:`list_files`,
  :func:`download_directory`, :func:`read_file`.
- :mod:`._delete`: :func:`delete`.
- :mod:`._folders`: listing a folder; :mod:`._parallel`: the thread pool.
"""

from __future__ import annotations

from dckpt._storage._delete import delete
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
from dckpt._storage._upload import upload_directory
from dckpt._storage._uri import is_local_uri, local_path_of, resolve_uri

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
