"""Checkpoints at fsspec URIs: atomic upload with a commit marker, parallel download.

A checkpoint at a URI is a folder (a key prefix, on object stores) of files. An upload
by dckpt brackets its files with two markers at the top of that folder:

1. :data:`PENDING_MARKER` is written first. It records which files the checkpoint being
   overwritten had (``"replaces"``) and which files this upload is about to write
   (``"uploading"``), so that a later upload or :func:`delete` can clean up after a
   failed one.
2. The files are uploaded, in parallel (``dckpt.storage.max-concurrency`` threads).
3. :data:`COMMIT_MARKER` is written last: a JSON manifest
   ``{"format_version": 1, "files": {relpath: size, ...}, "dirs": [relpath, ...]}``.
   ``"dirs"`` lists the empty folders, which object stores cannot hold on their own.
4. The pending marker is removed, then the files that the overwritten checkpoint had
   and this one does not.

Readers go by the markers (:func:`uri_status`): a commit marker means a finished
upload, whose files are exactly those its manifest lists (stale files are never
listed, even before they are removed); a pending marker without a commit marker means
an upload that never finished, which is refused; a folder without markers was uploaded
by some other tool and is accepted as it is, as Ray AIR does.

Every relative path that comes from a listing or a manifest passes
:func:`~dckpt.formats._paths.safe_relpath` before anything is written locally.

Storage options (endpoint, credentials, ...) go straight to fsspec. The thread pool
works for synchronous filesystems (``memory://``, local) and asynchronous ones
(``s3fs``, whose sync methods hand the call to fsspec's event-loop thread) alike.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import dask.config
import fsspec
import fsspec.core
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import get_filesystem_class, known_implementations

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointURIError,
    IncompleteCheckpointError,
)
from dckpt.formats._paths import safe_relpath

__all__ = [
    "COMMIT_MARKER",
    "MARKERS",
    "PENDING_MARKER",
    "delete",
    "download_directory",
    "is_local_uri",
    "list_files",
    "local_path_of",
    "read_file",
    "resolve_uri",
    "upload_directory",
    "uri_status",
]

logger = logging.getLogger(__name__)

PENDING_MARKER = ".dckpt_pending"
COMMIT_MARKER = ".dckpt_commit"
MARKERS = frozenset({PENDING_MARKER, COMMIT_MARKER})
FORMAT_VERSION = 1

# Filesystems where a folder exists apart from the files in it (and may be empty).
_FOLDERS_OF_THEIR_OWN = (LocalFileSystem, MemoryFileSystem)

# What to install when fsspec knows a protocol but its backend is not installed;
# fsspec's own hint ("Install s3fs to access S3") for the others.
_S3_HINT = "pip install 'dckpt[s3]' (which installs s3fs)"
_INSTALL_HINTS = {"s3": _S3_HINT, "s3a": _S3_HINT}


# ------------------------------------------------------------------------ URIs


def resolve_uri(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for ``uri`` and the path within it.

    Parameters
    ----------
    uri
        Any URI fsspec understands, chained ones included (``s3://bucket/prefix``).
    storage_options
        Passed unchanged to the filesystem (endpoint, credentials, ...).

    Raises
    ------
    CheckpointURIError
        fsspec does not know the protocol, or its backend package is not installed
        (the message names the package to install).
    """
    try:
        return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    except ImportError as e:
        protocol, advice = _install_advice(uri)
        said = "" if str(e) == advice else f" (fsspec: {e})"
        raise CheckpointURIError(
            f"cannot open {uri!r}: the fsspec backend for protocol {protocol!r} is not "
            f"installed; {advice}{said}"
        ) from e
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        protocol = str(e).partition(":")[2].strip() or fsspec.core.split_protocol(uri)[0]
        raise CheckpointURIError(
            f"cannot open {uri!r}: fsspec does not know the protocol {protocol!r}; "
            "check the spelling, or install the package that registers it with fsspec"
        ) from e


def _install_advice(uri: str) -> tuple[str, str]:
    """The first protocol of ``uri`` (chained or not) whose backend cannot be imported,
    and what to install for it."""
    protocols = [fsspec.core.split_protocol(part)[0] or "file" for part in uri.split("::")]
    missing = protocols[-1]
    for protocol in protocols:
        with contextlib.suppress(ValueError):
            try:
                get_filesystem_class(protocol)
            except ImportError:
                missing = protocol
                break
    if missing in _INSTALL_HINTS:
        return missing, f"install it with {_INSTALL_HINTS[missing]}"
    err = known_implementations.get(missing, {}).get("err")
    return missing, str(err or f"install the package that provides {missing!r} to fsspec")


def is_local_uri(uri: str) -> bool:
    """Whether ``uri`` is a plain path or a ``file://`` (or ``local://``) URI."""
    protocol = fsspec.core.split_protocol(os.fspath(uri))[0]
    return protocol in (None, "file", "local")


def local_path_of(uri: str) -> str:
    """The absolute local path of a ``file://`` URI or plain path (``~`` expanded).

    Raises
    ------
    CheckpointURIError
        ``uri`` is not local (see :func:`is_local_uri`).
    """
    if not is_local_uri(uri):
        raise CheckpointURIError(f"{uri!r} is not a local path or file:// URI")
    return os.path.abspath(LocalFileSystem._strip_protocol(os.fspath(uri)))


# ---------------------------------------------------------------------- upload


def upload_directory(
    local_dir: str | os.PathLike[str],
    uri: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    callback: Callback = DEFAULT_CALLBACK,
    overlay: Mapping[str, bytes | None] | None = None,
) -> None:
    """Upload the files of ``local_dir`` to the folder at ``uri``, commit marker last.

    The order of writes is what lets readers tell a finished upload from an unfinished
    one: the pending marker first (it records the file lists needed to clean up
    later), then the old commit marker is removed, then every file in parallel, then
    the commit marker (the manifest of every file uploaded and its size), and only
    then are the pending marker and the files of the overwritten checkpoint that this
    one lacks removed. Files that no dckpt marker ever listed are never removed.

    Files are read from ``local_dir`` recursively, following symbolic links (as
    ``shutil.copytree`` does; dangling links and special files are skipped). Files
    named like the markers at the top of ``local_dir`` are skipped. File modes are
    not kept: object stores have none. ``local_dir`` must not change meanwhile.

    Parameters
    ----------
    local_dir
        The directory to upload.
    uri
        The folder to upload into; an existing checkpoint there is replaced.
    storage_options
        Passed to fsspec.
    callback
        Counts files (``set_size`` to the number of files, ``relative_update(1)`` per
        file); the child from ``callback.branched(local, remote)`` counts bytes.
    overlay
        Files to write instead of those in ``local_dir``, by relative path: bytes
        replace (or add) a file, ``None`` leaves the file of ``local_dir`` out.

    Raises
    ------
    CheckpointNotFoundError
        ``local_dir`` is not a directory.
    UnsafePathError
        A file name that could not be downloaded safely again (backslashes, ...).
    OSError
        Any upload failed; the others are cancelled and the pending marker stays, so
        that readers see an unfinished upload.
    """
    source = os.path.abspath(os.fspath(local_dir))
    if not os.path.isdir(source):
        raise CheckpointNotFoundError(f"cannot upload {source}: it is not a directory")
    sources, empty_dirs = _local_tree(source)
    for name, content in (overlay or {}).items():
        rel = safe_relpath(name)
        if rel in MARKERS:
            raise ValueError(f"{name!r} is reserved for dckpt's upload markers")
        if content is None:
            sources.pop(rel, None)
        else:
            sources[rel] = bytes(content)
    sizes = {
        rel: len(src) if isinstance(src, bytes) else os.stat(src).st_size
        for rel, src in sources.items()
    }

    fs, root = resolve_uri(uri, storage_options)
    # fsspec's local put_file and pipe_file need the parent folders to exist; the
    # other filesystems make them (memory://) or have none (object stores).
    make_parents = isinstance(fs, LocalFileSystem) and not fs.auto_mkdir
    if make_parents:
        fs.makedirs(root, exist_ok=True)
    started = time.perf_counter()
    fs.invalidate_cache(root)
    commit_path, pending_path = _join(root, COMMIT_MARKER), _join(root, PENDING_MARKER)
    try:
        old_files = set(_read_marker(fs, commit_path, uri)["files"])
    except CheckpointFormatError as e:
        logger.warning("ignoring the unreadable commit marker at %s: %s", uri, e)
        old_files = set()
    except FileNotFoundError:
        old_files = set()
    # A pending marker left by a failed upload lists what that upload replaced and
    # what it had started to write: both are ours to clean up once this one commits.
    old_files |= _files_of_pending(fs, pending_path, uri)

    # Pending first, then drop the old commit marker: at no moment does the folder
    # look like a plain folder, and the old file list is never held by no marker.
    pending = {"format_version": FORMAT_VERSION, "replaces": sorted(old_files),
               "uploading": sorted(sizes)}
    fs.pipe_file(pending_path, _dump(pending))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(commit_path)

    # Object stores have no folders and ignore this; memory:// and local ones keep
    # empty ones. (The manifest lists those too, so downloads from any store have them.)
    folders = set(empty_dirs)
    if make_parents:
        folders |= {rel.rpartition("/")[0] for rel in sizes} - {""}
    _run_parallel(
        [functools.partial(fs.makedirs, _join(root, rel), exist_ok=True) for rel in folders]
    )

    def upload(rel: str, src: str | bytes) -> tuple[str, str, Callable[[Callback], None]]:
        rpath = _join(root, rel)
        if isinstance(src, bytes):
            def put(child: Callback, data: bytes = src) -> None:
                child.set_size(len(data))
                fs.pipe_file(rpath, data)
                child.relative_update(len(data))

            return f"<{rel}>", rpath, put
        return src, rpath, lambda child: fs.put_file(src, rpath, callback=child)

    _transfer_all([upload(rel, src) for rel, src in sorted(sources.items())], callback)

    manifest = {"format_version": FORMAT_VERSION, "files": dict(sorted(sizes.items())),
                "dirs": empty_dirs}
    fs.pipe_file(commit_path, _dump(manifest))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(pending_path)
    stale = sorted(old_files - set(sizes))
    _remove_all(fs, [_join(root, rel) for rel in stale])
    logger.debug(
        "uploaded %d files (%d bytes) to %s in %.2f s; removed %d stale files",
        len(sizes), sum(sizes.values()), uri, time.perf_counter() - started, len(stale),
    )


def _local_tree(source: str) -> tuple[dict[str, str | bytes], list[str]]:
    """``relpath -> local path`` of the files below ``source``, and its empty folders."""
    files: dict[str, str | bytes] = {}
    empty_dirs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        rel_dir = os.path.relpath(dirpath, source).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir and _links_to_ancestor(dirpath, source):
            logger.debug("not following %s: it links to a folder above it", dirpath)
            dirnames[:] = []
            continue
        kept = 0
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not rel_dir and name in MARKERS:
                logger.debug("not uploading %s: the name is dckpt's marker", path)
            elif not os.path.isfile(path):
                logger.debug("not uploading %s: dangling link or special file", path)
            else:
                files[safe_relpath(f"{rel_dir}/{name}" if rel_dir else name)] = path
                kept += 1
        if rel_dir and not dirnames and not kept:
            empty_dirs.append(safe_relpath(rel_dir))
    return files, sorted(empty_dirs)


def _links_to_ancestor(dirpath: str, source: str) -> bool:
    real = os.path.realpath(dirpath)
    parent = os.path.dirname(dirpath)
    while len(parent) >= len(source):
        if os.path.realpath(parent) == real:
            return True
        parent = os.path.dirname(parent)
    return False


# ---------------------------------------------------------------------- reading


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
        rpath, lpath = _join(root, rel), os.path.join(target, *rel.split("/"))

        def get(child: Callback) -> None:
            try:
                fs.get_file(rpath, lpath, callback=child)
            except FileNotFoundError as e:
                raise CheckpointFormatError(
                    f"{rel!r} of the checkpoint at {uri} is missing: it was removed "
                    f"{since}; upload the checkpoint again"
                ) from e

        return rpath, lpath, get

    _transfer_all([download(rel) for rel in sorted(files)], callback)

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
            if rel not in _read_marker(fs, _join(root, COMMIT_MARKER), uri)["files"]:
                return None
        except FileNotFoundError:
            pass  # a plain folder (or an unfinished upload): read what is there
    try:
        return bytes(fs.cat_file(_join(root, rel)))
    except FileNotFoundError:
        return None


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
    commit_path, pending_path = _join(root, COMMIT_MARKER), _join(root, PENDING_MARKER)
    try:
        listed = set(_read_marker(fs, commit_path, uri)["files"])
        committed = True
    except FileNotFoundError:
        listed, committed = set(), False
    has_pending = fs.exists(pending_path)
    if not committed and not has_pending:
        found = _file_paths(fs, root)
        if not found:
            raise CheckpointNotFoundError(f"no checkpoint at {uri}: nothing is there")
        _remove_all(fs, found)
        _remove_empty_folders(fs, root)
        logger.debug("removed the %d files of the plain folder %s", len(found), uri)
        return
    if committed:
        fs.rm_file(commit_path)
    listed |= _files_of_pending(fs, pending_path, uri)
    _remove_all(fs, [_join(root, rel) for rel in sorted(listed)])
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(pending_path)
    _remove_empty_folders(fs, root)
    logger.debug("removed %d files of the checkpoint at %s", len(listed), uri)


# ---------------------------------------------------------------------- helpers


def _status(
    fs: fsspec.AbstractFileSystem, root: str, uri: str
) -> Literal["committed", "plain"]:
    # Another process may have written since this (cached) instance last listed.
    fs.invalidate_cache(root)
    if fs.exists(_join(root, COMMIT_MARKER)):
        return "committed"
    if fs.exists(_join(root, PENDING_MARKER)):
        raise IncompleteCheckpointError(
            f"the dckpt upload at {uri} never finished (there is no commit marker, "
            f"only {PENDING_MARKER}); upload the checkpoint again, or use an older one"
        )
    if not _has_files(fs, root):
        raise CheckpointNotFoundError(f"no checkpoint at {uri}: nothing is there")
    return "plain"


def _contents(
    fs: fsspec.AbstractFileSystem, root: str, uri: str, status: str
) -> tuple[dict[str, int], list[str]]:
    """Files (``relpath -> size``) and folders of a checkpoint whose status is known."""
    if status == "committed":
        manifest = _read_marker(fs, _join(root, COMMIT_MARKER), uri)
        return manifest["files"], manifest["dirs"]
    return _listing(fs, root, uri)


def _listing(
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
    if isinstance(fs, _FOLDERS_OF_THEIR_OWN):
        # Empty folders exist only here; on object stores folders are implied by keys.
        for name, info in fs.find(root, withdirs=True, detail=True).items():
            if info.get("type") == "directory" and name.startswith(prefix):
                dirs.add(safe_relpath(name[len(prefix):]))
    return files, sorted(dirs)


def _file_paths(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Full paths of the files below ``root``, markers included, names unchecked."""
    prefix = root.rstrip("/") + "/"
    return [name for name in fs.find(root) if name.startswith(prefix)]


def _has_files(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether any file other than the markers lies below ``root``."""
    markers = {_join(root, name) for name in MARKERS}
    return any(name not in markers for name in _file_paths(fs, root))


def _remove_empty_folders(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove the folders below ``root``, and ``root``, that hold nothing any more.

    Only where folders exist on their own; object stores have none to remove.
    """
    if not isinstance(fs, _FOLDERS_OF_THEIR_OWN):
        return
    folders = [
        name for name, info in fs.find(root, withdirs=True, detail=True).items()
        if info.get("type") == "directory"
    ]
    for folder in sorted(set(folders) | {fs._strip_protocol(root)}, key=len, reverse=True):
        # OSError: not empty (someone else's files are left alone) or already gone.
        with contextlib.suppress(OSError):
            fs.rmdir(folder)


def _read_marker(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> dict[str, Any]:
    """The parsed commit marker at ``path``; ``FileNotFoundError`` if there is none."""
    raw = fs.cat_file(path)
    try:
        doc = json.loads(raw)
        version = doc["format_version"]
        files = {safe_relpath(rel): int(size) for rel, size in doc["files"].items()}
        dirs = [safe_relpath(rel) for rel in doc.get("dirs", [])]
    except CheckpointFormatError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointFormatError(
            f"the commit marker at {uri} is not a dckpt manifest ({e!r}); "
            "upload the checkpoint again"
        ) from e
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"the checkpoint at {uri} was written in format {version!r}, newer than "
            f"this dckpt reads ({FORMAT_VERSION}); upgrade dckpt"
        )
    if MARKERS & files.keys() or any(size < 0 for size in files.values()):
        raise CheckpointFormatError(f"the commit marker at {uri} lists impossible files")
    return {"format_version": version, "files": files, "dirs": dirs}


def _files_of_pending(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> set[str]:
    """The files an unfinished upload replaced or wrote, by its pending marker."""
    try:
        doc = json.loads(fs.cat_file(path))
        return {safe_relpath(rel) for key in ("replaces", "uploading") for rel in doc[key]}
    except FileNotFoundError:
        return set()
    except (ValueError, TypeError, KeyError) as e:
        # Not ours to clean up, then: only files a dckpt marker listed are removed.
        logger.warning("ignoring the unreadable pending marker at %s: %r", uri, e)
        return set()


def _transfer_all(
    jobs: Sequence[tuple[str, str, Callable[[Callback], None]]], callback: Callback
) -> None:
    """Run ``(source, destination, fn(child_callback))`` jobs with progress."""
    callback.set_size(len(jobs))
    lock = threading.Lock()  # callbacks (tqdm, ...) are not thread-safe

    def run(source: str, destination: str, fn: Callable[[Callback], None]) -> None:
        with lock:
            child = callback.branched(source, destination)
        with child:
            fn(child)
        with lock:
            callback.relative_update(1)

    _run_parallel([functools.partial(run, *job) for job in jobs])


def _remove_all(fs: fsspec.AbstractFileSystem, paths: Sequence[str]) -> None:
    """Remove files, in parallel; those already gone are fine."""

    def remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    _run_parallel([functools.partial(remove, path) for path in paths])


def _run_parallel(tasks: Sequence[Callable[[], None]]) -> None:
    """Run ``tasks`` on ``dckpt.storage.max-concurrency`` threads; raise the first
    failure once the running tasks have ended (those not started never start)."""
    if not tasks:
        return
    workers = min(max(1, int(dask.config.get("dckpt.storage.max-concurrency"))), len(tasks))
    executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dckpt-io")
    try:
        futures = [executor.submit(task) for task in tasks]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        if not future.cancelled() and (error := future.exception()) is not None:
            raise error


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}"


def _dump(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode()
