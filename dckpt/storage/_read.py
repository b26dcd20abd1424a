"""Reading a checkpoint at a URI: its status, its file list, one file, all of it.

Readers go by the markers of :mod:`._protocol`: the manifest of a committed
checkpoint, else a listing of a plain folder; an unfinished upload is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import fsspec
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
)
from dckpt.formats._paths import safe_relpath
from dckpt.storage._folders import has_files, listing
from dckpt.storage._parallel import transfer_all
from dckpt.storage._protocol import (
    COMMIT_MARKER,
    MARKERS,
    PENDING_MARKER,
    join,
    read_marker,
)
from dckpt.storage._uri import resolve_uri

logger = logging.getLogger(__name__)


def uri_status(
    uri: str, *, storage_options: Mapping[str, Any] | None = None
) -> Literal["committed", "plain"]:
    """Tell what the folder at ``uri`` holds.

    Returns
    -------
    ``"committed"``
        A finished dckpt upload (its commit marker exists).
    ``"plain"``
        Files but no dckpt marker: a folder uploaded by another tool, accepted as a
        checkpoint as it is.

    Raises
    ------
    IncompleteCheckpointError
        A dckpt upload that never finished (a pending marker, no commit marker).
    CheckpointNotFoundError
        Nothing at ``uri``.
    """
    fs, root = resolve_uri(uri, storage_options)
    return _status(fs, root, uri)


def list_files(
    uri: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """``relpath -> size`` of the files of the checkpoint at ``uri``.

    From the manifest of a committed checkpoint (so files left over from a checkpoint
    it replaced are never listed), else from a listing of the folder minus the
    markers. Every name has passed :func:`~dckpt.formats._paths.safe_relpath`.

    Raises
    ------
    UnsafePathError
        A name that would lead outside the folder (``a/../../x``, ...).
    IncompleteCheckpointError, CheckpointNotFoundError
        As :func:`uri_status`.
    """
    fs, root = resolve_uri(uri, storage_options)
    return _contents(fs, root, uri, _status(fs, root, uri))[0]


def download_directory(
    uri: str,
    local_dir: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    callback: Callback = DEFAULT_CALLBACK,
) -> None:
    """Download the checkpoint at ``uri`` into the existing, empty ``local_dir``.

    Unfinished uploads are refused before anything is written. Files are fetched in
    parallel (``dckpt.storage.max-concurrency`` threads) and their sizes checked
    afterwards against the manifest (or, for a plain folder, the listing). On error,
    files may have been written to ``local_dir``: pass a partial sibling from
    :func:`dckpt.formats._atomic.atomic_directory`, which removes it.

    Parameters
    ----------
    callback
        Counts files; the child from ``callback.branched(remote, local)`` counts bytes.

    Raises
    ------
    IncompleteCheckpointError, CheckpointNotFoundError
        As :func:`uri_status`.
    UnsafePathError
        A name that would lead outside ``local_dir``; nothing was written.
    CheckpointFormatError
        A file is missing, or its size differs from the manifest's: it changed after
        the checkpoint was committed.
    """
    target = os.path.abspath(os.fspath(local_dir))
    fs, root = resolve_uri(uri, storage_options)
    started = time.perf_counter()
    status = _status(fs, root, uri)
    since = ("since the checkpoint was committed" if status == "committed"
             else "while the folder was being downloaded")
    files, dirs = _contents(fs, root, uri, status)
    folders = sorted({rel.rpartition("/")[0] for rel in files} | set(dirs))
    # Checked before anything is written: object stores allow keys "a" and "a/b".
    ancestors = {f.rsplit("/", i)[0] for f in folders if f for i in range(f.count("/") + 1)}
    clash = next(iter(sorted(ancestors & files.keys())), None)
    if clash is not None:
        raise CheckpointFormatError(
            f"{uri} holds both a file and a folder named {clash!r}; "
            "it cannot be written to a local directory"
        )
    for folder in folders:
        os.makedirs(os.path.join(target, *folder.split("/")), exist_ok=True)

    def download(rel: str) -> tuple[str, str, Callable[[Callback], None]]:
        rpath, lpath = join(root, rel), os.path.join(target, *rel.split("/"))

        def get(child: Callback) -> None:
            try:
                fs.get_file(rpath, lpath, callback=child)
            except FileNotFoundError as e:
                raise CheckpointFormatError(
                    f"{rel!r} of the checkpoint at {uri} is missing: it was removed "
                    f"{since}; upload the checkpoint again"
                ) from e

        return rpath, lpath, get

    transfer_all([download(rel) for rel in sorted(files)], callback)

    for rel, size in files.items():
        actual = os.path.getsize(os.path.join(target, *rel.split("/")))
        if actual != size:
            raise CheckpointFormatError(
                f"{rel!r} of the checkpoint at {uri} has {actual} bytes, but its "
                f"{'manifest' if status == 'committed' else 'listing'} says {size}: "
                f"the file changed {since}; upload the checkpoint again"
            )
    logger.debug(
        "downloaded %d files (%d bytes) of %s checkpoint %s in %.2f s",
        len(files), sum(files.values()), status, uri, time.perf_counter() - started,
    )


def read_file(
    uri: str, relpath: str, *, storage_options: Mapping[str, Any] | None = None
) -> bytes | None:
    """The bytes of one (small) file of the checkpoint at ``uri``, ``None`` if absent.

    Reads metadata without downloading everything. For a committed checkpoint, a file
    its manifest does not list is absent, even while a stale copy of it still exists.
    The caller checks :func:`uri_status` first.

    Parameters
    ----------
    uri
        The checkpoint's folder.
    relpath
        The file's path relative to it, ``/``-separated; markers may be read too.
    storage_options
        Passed to fsspec.

    Raises
    ------
    UnsafePathError
        ``relpath`` leads outside the folder.
    """
    fs, root = resolve_uri(uri, storage_options)
    rel = safe_relpath(relpath)
    if rel not in MARKERS:
        try:
            if rel not in read_marker(fs, join(root, COMMIT_MARKER), uri)["files"]:
                return None
        except FileNotFoundError:
            pass  # a plain folder (or an unfinished upload): read what is there
    try:
        return bytes(fs.cat_file(join(root, rel)))
    except FileNotFoundError:
        return None


def _status(
    fs: fsspec.AbstractFileSystem, root: str, uri: str
) -> Literal["committed", "plain"]:
    # Another process may have written since this (cached) instance last listed.
    fs.invalidate_cache(root)
    if fs.exists(join(root, COMMIT_MARKER)):
        return "committed"
    if fs.exists(join(root, PENDING_MARKER)):
        raise IncompleteCheckpointError(
            f"the dckpt upload at {uri} never finished (there is no commit marker, "
            f"only {PENDING_MARKER}); upload the checkpoint again, or use an older one"
        )
    if not has_files(fs, root):
        raise CheckpointNotFoundError(f"no checkpoint at {uri}: nothing is there")
    return "plain"


def _contents(
    fs: fsspec.AbstractFileSystem, root: str, uri: str, status: str
) -> tuple[dict[str, int], list[str]]:
    """Files (``relpath -> size``) and folders of a checkpoint whose status is known."""
    if status == "committed":
        manifest = read_marker(fs, join(root, COMMIT_MARKER), uri)
        return manifest["files"], manifest["dirs"]
    return listing(fs, root, uri)
