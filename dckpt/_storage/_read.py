"""Reading a checkpoint at a URI: its status, its file list, one file, all of it.

Readers go by the markers of :mod:`._protocol`: the manifest of a committed
checkpoint (which says where its files are stored), else a listing of a plain folder;
an unfinished upload is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import fsspec
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt._formats import safe_relpath
from dckpt._storage._fs import resolve_uri, transfer_all, translated
from dckpt._storage._protocol import (
    COMMIT_MARKER,
    MARKERS,
    PENDING_MARKER,
    CommitRecord,
    fingerprint,
    has_files,
    join,
    listing,
    read_commit,
    read_commit_or_none,
)
from dckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
)

logger = logging.getLogger(__name__)


@translated("read the checkpoint at", reading=True)
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
        Nothing at ``uri`` (a missing bucket too).
    StorageError
        The storage back-end failed: no credentials, no connection, ... (see
        :mod:`._fs`); the same for every function of this module.
    """
    fs, root = resolve_uri(uri, storage_options)
    return _status(fs, root, uri)


@translated("read the checkpoint at", reading=True)
def uri_version(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """A string that identifies what the checkpoint at ``uri`` holds now.

    For a committed checkpoint, the version its upload chose (new for every upload,
    the same while it stays committed); for a plain folder, a fingerprint of its
    listing (names, sizes, ETags or modification times). Local copies of a URI
    checkpoint are keyed by it, so that a rewritten URI is never served from a
    stale copy.

    Raises
    ------
    IncompleteCheckpointError, CheckpointNotFoundError, StorageError
        As :func:`uri_status`.
    """
    fs, root = resolve_uri(uri, storage_options)
    if _status(fs, root, uri) == "committed":
        return _committed(fs, root, uri).version
    return "plain:" + fingerprint(fs, root)


@translated("read the checkpoint at", reading=True)
def list_files(
    uri: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """``relpath -> size`` of the files of the checkpoint at ``uri``.

    From the manifest of a committed checkpoint (so files left over from a checkpoint
    it replaced are never listed), else from a listing of the folder minus the
    markers. Every name has passed :func:`~dckpt._formats._paths.safe_relpath`.

    Raises
    ------
    UnsafePathError
        A name that would lead outside the folder (``a/../../x``, ...).
    IncompleteCheckpointError, CheckpointNotFoundError
        As :func:`uri_status`.
    """
    fs, root = resolve_uri(uri, storage_options)
    return _contents(fs, root, uri, _status(fs, root, uri)).files


@translated("download the checkpoint at", reading=True)
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
    afterwards against the manifest (or, for a plain folder, the listing); the
    permission bits the manifest records are restored (files of a plain folder, and
    files a format-1 manifest lists, keep the local default). If the checkpoint is
    rewritten meanwhile (its version changes), the download is refused. On error,
    files may have been written to ``local_dir``: pass a partial sibling from
    :func:`dckpt._formats._atomic.atomic_directory`, which removes it.

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
        the checkpoint was committed, or the checkpoint was rewritten meanwhile.
    """
    target = os.path.abspath(os.fspath(local_dir))
    fs, root = resolve_uri(uri, storage_options)
    started = time.perf_counter()
    status = _status(fs, root, uri)
    since = ("since the checkpoint was committed" if status == "committed"
             else "while the folder was being downloaded")
    contents = _contents(fs, root, uri, status)
    files, dirs = contents.files, contents.dirs
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
        rpath = join(root, contents.stored(rel))
        lpath = os.path.join(target, *rel.split("/"))

        def get(child: Callback) -> None:
            try:
                fs.get_file(rpath, lpath, callback=child)
            except FileNotFoundError as e:
                raise CheckpointFormatError(
                    f"{rel!r} of the checkpoint at {uri} is missing: it was removed "
                    f"{since}; upload the checkpoint again"
                ) from e
            if rel in contents.modes:
                os.chmod(lpath, contents.modes[rel])

        return rpath, lpath, get

    transfer_all([download(rel) for rel in sorted(files)], callback)

    if status == "committed":
        now = read_commit_or_none(fs, root, uri)
        if now is None or now.version != contents.version:
            raise CheckpointFormatError(
                f"the checkpoint at {uri} was rewritten or deleted while it was being "
                "downloaded; download it again"
            )
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


@translated("read the checkpoint at", reading=True)
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
        manifest = read_commit_or_none(fs, root, uri)
        if manifest is not None:
            if rel not in manifest.files:
                return None
            rel = manifest.stored(rel)
        # else a plain folder (or an unfinished upload): read what is there
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


def _committed(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> CommitRecord:
    try:
        return read_commit(fs, root, uri)
    except FileNotFoundError as e:  # deleted since _status saw it
        raise CheckpointNotFoundError(f"no checkpoint at {uri}: it was just deleted") from e


def _contents(
    fs: fsspec.AbstractFileSystem, root: str, uri: str, status: str
) -> CommitRecord:
    """Files (``relpath -> size``), where they are, and folders of a checkpoint whose
    status is known; a plain folder as a manifest of its listing."""
    if status == "committed":
        return _committed(fs, root, uri)
    files, dirs = listing(fs, root, uri)
    return CommitRecord(version="", prefix="", files=files, modes={}, dirs=dirs)
