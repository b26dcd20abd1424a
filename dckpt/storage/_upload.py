"""Uploading a local directory to a URI by the marker protocol of :mod:`._protocol`.

Pending marker first, files in parallel, commit marker last, then the clean-up of
what the overwritten checkpoint had and this one lacks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.implementations.local import LocalFileSystem

from dckpt.errors import CheckpointFormatError, CheckpointNotFoundError
from dckpt.formats._paths import safe_relpath
from dckpt.storage._parallel import remove_all, run_parallel, transfer_all
from dckpt.storage._protocol import (
    COMMIT_MARKER,
    FORMAT_VERSION,
    MARKERS,
    PENDING_MARKER,
    dump_marker,
    files_of_pending,
    join,
    read_marker,
)
from dckpt.storage._uri import resolve_uri

logger = logging.getLogger(__name__)


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
    commit_path, pending_path = join(root, COMMIT_MARKER), join(root, PENDING_MARKER)
    try:
        old_files = set(read_marker(fs, commit_path, uri)["files"])
    except CheckpointFormatError as e:
        logger.warning("ignoring the unreadable commit marker at %s: %s", uri, e)
        old_files = set()
    except FileNotFoundError:
        old_files = set()
    # A pending marker left by a failed upload lists what that upload replaced and
    # what it had started to write: both are ours to clean up once this one commits.
    old_files |= files_of_pending(fs, pending_path, uri)

    # Pending first, then drop the old commit marker: at no moment does the folder
    # look like a plain folder, and the old file list is never held by no marker.
    pending = {"format_version": FORMAT_VERSION, "replaces": sorted(old_files),
               "uploading": sorted(sizes)}
    fs.pipe_file(pending_path, dump_marker(pending))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(commit_path)

    # Object stores have no folders and ignore this; memory:// and local ones keep
    # empty ones. (The manifest lists those too, so downloads from any store have them.)
    folders = set(empty_dirs)
    if make_parents:
        folders |= {rel.rpartition("/")[0] for rel in sizes} - {""}
    run_parallel(
        [functools.partial(fs.makedirs, join(root, rel), exist_ok=True) for rel in folders]
    )

    def upload(rel: str, src: str | bytes) -> tuple[str, str, Callable[[Callback], None]]:
        rpath = join(root, rel)
        if isinstance(src, bytes):
            def put(child: Callback, data: bytes = src) -> None:
                child.set_size(len(data))
                fs.pipe_file(rpath, data)
                child.relative_update(len(data))

            return f"<{rel}>", rpath, put
        return src, rpath, lambda child: fs.put_file(src, rpath, callback=child)

    transfer_all([upload(rel, src) for rel, src in sorted(sources.items())], callback)

    manifest = {"format_version": FORMAT_VERSION, "files": dict(sorted(sizes.items())),
                "dirs": empty_dirs}
    fs.pipe_file(commit_path, dump_marker(manifest))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(pending_path)
    stale = sorted(old_files - set(sizes))
    remove_all(fs, [join(root, rel) for rel in stale])
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
