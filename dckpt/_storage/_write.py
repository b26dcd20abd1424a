"""Writing at a URI: uploading a local directory, and deleting a checkpoint.

Both follow the marker protocol of :mod:`._protocol`. An upload: pending marker first,
files in parallel (beside the checkpoint they replace), commit marker last, then the
move of the files to the top and the clean-up of what the overwritten checkpoint had
and this one lacks.

**Files an upload need not send.** A run persists its checkpoints side by side
(``s3://bucket/run/step-0009``, ``.../step-0010``), and most of their files are often
the same bytes (frozen weights, tokenizers). When the caller of
:func:`~dckpt._storage.upload_directory` gives each file's content hash, the commit
marker records them, and a later upload next to it copies a file with the same hash and
size from there (``fs.cp_file``: a server-side copy on object stores, no byte through
this process) instead of uploading it.

The result is still a plain folder of whole files: nothing points to the earlier
checkpoint, which may be deleted or overwritten afterwards. What is trusted, and why
that is safe: the earlier folder is plain too, so another tool may have rewritten a
file there since. Its marker therefore also records, per file, a *token* of the stored
object (:func:`object_token`: its ETag or version, modification or creation time and
size, whatever the back-end gives) taken when it was committed, and a file is copied
only while its token is unchanged; a back-end that gives no such field gets no tokens,
and nothing is ever copied from it.

Only the last :data:`SIBLINGS_SETTING` folders next to the upload, in name order
(runs name their checkpoints by step or time), are looked at: one listing and one
small read each.

**Deleting** goes commit marker first, then the files it lists. Only files a dckpt
marker lists are removed (or every file of a plain folder), one by one, never with a
recursive or glob ``fs.rm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import dask.config
import fsspec
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.implementations.local import LocalFileSystem

from dckpt._formats import safe_relpath
from dckpt._storage._fs import (
    remove_all,
    resolve_uri,
    run_parallel,
    transfer_all,
    translated,
)
from dckpt._storage._protocol import (
    COMMIT_MARKER,
    FORMAT_VERSION,
    PENDING_MARKER,
    VERSIONS_FOLDER,
    CommitRecord,
    dump_marker,
    file_paths,
    files_of_pending,
    is_reserved,
    join,
    join_rel,
    new_version,
    read_commit_or_none,
    remove_empty_folders,
    write_commit,
)
from dckpt.errors import CheckpointFormatError, CheckpointNotFoundError

logger = logging.getLogger(__name__)



@translated("upload to", reading=False)
def upload_directory(
    local_dir: str | os.PathLike[str],
    uri: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    callback: Callback = DEFAULT_CALLBACK,
    overlay: Mapping[str, bytes | None] | None = None,
    hashes: Mapping[str, str] | None = None,
) -> None:
    """Upload the files of ``local_dir`` to the folder at ``uri``, commit marker last.

    The steps (see :mod:`._protocol`): the pending marker first (it records the file
    lists needed to clean up later); every file in parallel, to the top of the folder,
    or, when a committed checkpoint is there already, under
    ``.dckpt_versions/<version>/`` beside it, which stays readable meanwhile; then the
    commit marker (the manifest of every file, its size and mode); then the new files
    are copied to the top and the commit marker switched to them, and whatever the
    replaced checkpoint and failed uploads left is removed. Files that no dckpt marker
    ever listed are never removed. A completed upload is a plain folder of the files
    plus the commit marker, ``.dckpt_commit``.

    Files are read from ``local_dir`` recursively, following symbolic links (as
    ``shutil.copytree`` does; dangling links and special files are skipped). Files
    named like dckpt's own (``.dckpt_commit``, ``.dckpt_pending``, ``.dckpt_versions``)
    at the top of ``local_dir`` are skipped. Permission bits (``0o777``) are recorded
    in the manifest and restored by :func:`download_directory`; those of ``overlay``
    files are not. ``local_dir`` must not change meanwhile. A bucket that does not
    exist is not created: :class:`~dckpt.errors.StorageError`.

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
    hashes
        The xxh3-128 content hash of files of ``local_dir``, by relative path, if the
        caller knows them. They are recorded in the commit marker, and a file with
        the same hash and size in a checkpoint committed next to ``uri`` (a sibling
        folder, ``dckpt.storage.reuse-siblings`` of them at most) is copied from there,
        server-side, instead of uploaded; see :mod:`._write` for what is trusted. The
        result is the same plain folder of whole files.

    Raises
    ------
    CheckpointNotFoundError
        ``local_dir`` is not a directory.
    UnsafePathError
        A file name that could not be downloaded safely again (backslashes, ...).
    StorageError
        Any upload failed (an ``OSError``, the back-end's exception as its cause); the
        others are cancelled and the pending marker stays: readers see the checkpoint
        that was there before, or an unfinished upload if there was none.
    """
    source = os.path.abspath(os.fspath(local_dir))
    if not os.path.isdir(source):
        raise CheckpointNotFoundError(f"cannot upload {source}: it is not a directory")
    sources, empty_dirs = _local_tree(source)
    for name, content in (overlay or {}).items():
        rel = safe_relpath(name)
        if is_reserved(rel):
            raise ValueError(f"{name!r} is reserved for dckpt's upload markers")
        if content is None:
            sources.pop(rel, None)
        else:
            sources[rel] = bytes(content)
    sizes: dict[str, int] = {}
    modes: dict[str, int] = {}
    for rel, src in sources.items():
        if isinstance(src, bytes):
            sizes[rel] = len(src)
        else:
            stat = os.stat(src)
            sizes[rel], modes[rel] = stat.st_size, stat.st_mode & 0o777
    # Only of files read from local_dir (not overlay bytes), by their safe names.
    known = {safe_relpath(rel): h for rel, h in (hashes or {}).items()}
    known = {rel: h for rel, h in known.items() if isinstance(sources.get(rel), str)}

    fs, root = resolve_uri(uri, storage_options)
    # fsspec's local put_file, pipe_file and cp_file need the parent folders to
    # exist; the other filesystems make them (memory://) or have none (object stores).
    make_parents = isinstance(fs, LocalFileSystem) and not fs.auto_mkdir
    if make_parents:
        fs.makedirs(root, exist_ok=True)
    started = time.perf_counter()
    fs.invalidate_cache(root)
    try:
        old = read_commit_or_none(fs, root, uri)
    except CheckpointFormatError as e:
        logger.warning("ignoring the unreadable commit marker at %s: %s", uri, e)
        old = None
    version = new_version()
    # Beside a committed checkpoint, so that it stays readable until the switch.
    prefix = "" if old is None else f"{VERSIONS_FOLDER}/{version}"
    staged = {join_rel(prefix, rel) for rel in sizes}
    # A pending marker left by a failed upload lists what that upload replaced and
    # what it had started to write: both are ours to clean up once this one commits.
    leftovers = files_of_pending(fs, root, uri)
    if old is not None:
        leftovers |= {old.stored(rel) for rel in old.files}
    pending = {"format_version": FORMAT_VERSION, "version": version,
               "replaces": sorted(leftovers), "uploading": sorted(staged | set(sizes))}
    fs.pipe_file(join(root, PENDING_MARKER), dump_marker(pending))

    # Object stores have no folders and ignore this; memory:// and local ones keep
    # empty ones. (The manifest lists those too, so downloads from any store have them.)
    folders = {join_rel(prefix, rel) for rel in empty_dirs}
    parents = {rel.rpartition("/")[0] for rel in sizes} - {""}
    if make_parents:
        folders |= {join_rel(prefix, rel) for rel in parents} | ({prefix} - {""})
    _make_folders(fs, root, folders)

    reused = reusable_files(fs, root, uri, known, sizes) if known else {}

    def upload(rel: str, src: str | bytes) -> tuple[str, str, Callable[[Callback], None]]:
        rpath = join(root, join_rel(prefix, rel))
        if rel in reused:
            def copy(child: Callback, stored: str = reused[rel]) -> None:
                child.set_size(sizes[rel])
                fs.cp_file(stored, rpath)  # server-side on object stores
                child.relative_update(sizes[rel])

            return _stored_name(reused[rel]), rpath, copy
        if isinstance(src, bytes):
            def put(child: Callback, data: bytes = src) -> None:
                child.set_size(len(data))
                fs.pipe_file(rpath, data)
                child.relative_update(len(data))

            return f"<{rel}>", rpath, put
        return src, rpath, lambda child: fs.put_file(src, rpath, callback=child)

    transfer_all([upload(rel, src) for rel, src in sorted(sources.items())], callback)

    manifest = CommitRecord(version, prefix, dict(sorted(sizes.items())), modes, empty_dirs,
                        known, _tokens(fs, root, prefix, known))
    write_commit(fs, root, manifest)  # the switch: from here on, readers see this one
    stale = sorted(leftovers - set(sizes))
    remove_all(fs, [join(root, rel) for rel in stale])
    if prefix:
        # Back to a plain folder: the new files to the top, then the marker to them.
        # A folder the old checkpoint had may be a file of the new one (local disks).
        remove_empty_folders(fs, root)
        _make_folders(fs, root, set(empty_dirs) | (parents if make_parents else set()))
        run_parallel([
            functools.partial(fs.cp_file, join(root, join_rel(prefix, rel)), join(root, rel))
            for rel in sorted(sizes)
        ])
        write_commit(fs, root, dataclasses.replace(manifest, prefix="",
                                                      tokens=_tokens(fs, root, "", known)))
        remove_all(fs, [join(root, rel) for rel in sorted(staged)])
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(join(root, PENDING_MARKER))
    remove_empty_folders(fs, join(root, VERSIONS_FOLDER))
    logger.debug(
        "uploaded %d files (%d bytes, %d files copied from checkpoints next to it) to %s "
        "in %.2f s; removed %d stale files", len(sizes), sum(sizes.values()), len(reused),
        uri, time.perf_counter() - started, len(stale),
    )


def _stored_name(path: str) -> str:
    """How progress names a file copied from storage."""
    return f"<{path}>"


def _tokens(
    fs: fsspec.AbstractFileSystem, root: str, prefix: str, hashed: Mapping[str, str]
) -> dict[str, str]:
    """The token (:func:`~dckpt._storage._write.object_token`) of each hashed file as
    stored now under ``prefix``; files whose back-end gives none get none."""
    tokens: dict[str, str] = {}
    fs.invalidate_cache(root)

    def take(rel: str) -> None:
        token = object_token(fs, join(root, join_rel(prefix, rel)))
        if token is not None:
            tokens[rel] = token  # one key per thread: no lock needed

    run_parallel([functools.partial(take, rel) for rel in sorted(hashed)])
    return dict(sorted(tokens.items()))


def _make_folders(fs: fsspec.AbstractFileSystem, root: str, folders: set[str]) -> None:
    run_parallel(
        [functools.partial(fs.makedirs, join(root, rel), exist_ok=True) for rel in folders]
    )


def _local_tree(source: str) -> tuple[dict[str, str | bytes], list[str]]:
    """``relpath -> local path`` of the files below ``source``, and its empty folders."""
    files: dict[str, str | bytes] = {}
    empty_dirs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        rel_dir = os.path.relpath(dirpath, source).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir and is_reserved(rel_dir):
            logger.debug("not uploading %s: the name is dckpt's own", dirpath)
            dirnames[:] = []
            continue
        if rel_dir and _links_to_ancestor(dirpath, source):
            logger.debug("not following %s: it links to a folder above it", dirpath)
            dirnames[:] = []
            continue
        kept = 0
        for name in filenames:
            path = os.path.join(dirpath, name)
            if is_reserved(f"{rel_dir}/{name}" if rel_dir else name):
                logger.debug("not uploading %s: the name is dckpt's own", path)
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


SIBLINGS_SETTING = "dckpt.storage.reuse-siblings"


# Fields of fsspec's info() that change whenever an object is written: S3's ETag (the
# md5 of the bytes, or of the parts) and version, GCS's generation, local and memory
# files' times. The size alone is no token.
_TOKEN_FIELDS = ("ETag", "etag", "VersionId", "generation", "LastModified", "mtime",
                 "created", "ino")


def object_token(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """What tells whether the object at ``path`` was written since; None if the
    back-end says nothing that would."""
    info = fs.info(path)
    fields = [f"{key}={info[key]}" for key in _TOKEN_FIELDS if info.get(key) is not None]
    if not fields:
        return None
    return "|".join([f"size={info.get('size')}", *fields])


def reusable_files(
    fs: fsspec.AbstractFileSystem,
    root: str,
    uri: str,
    hashes: Mapping[str, str],
    sizes: Mapping[str, int],
) -> dict[str, str]:
    """``relpath -> stored path`` of a file with that hash and size in a checkpoint
    next to ``root``, unchanged since it was committed there.

    Best effort: a sibling that cannot be listed or read is skipped (logged), and
    nothing is ever copied whose token does not match.
    """
    limit = int(dask.config.get(SIBLINGS_SETTING))
    wanted = {(hashes[rel], sizes[rel]): rel for rel in hashes if rel in sizes and sizes[rel]}
    if limit <= 0 or not wanted:
        return {}
    parent = root.rstrip("/").rpartition("/")[0]
    if not parent:
        return {}
    try:
        names = sorted(n.rstrip("/") for n in fs.ls(parent, detail=False))
    except (OSError, ValueError) as e:
        logger.debug("not reusing files next to %s: cannot list %s (%r)", uri, parent, e)
        return {}
    candidates = [n for n in names if n != root.rstrip("/")][-limit:]
    found: dict[str, str] = {}
    for sibling in reversed(candidates):  # the newest first
        try:
            fs.invalidate_cache(sibling)  # tokens from a fresh look, not an old listing
            manifest = read_commit_or_none(fs, sibling, sibling)
        except (OSError, ValueError) as e:
            logger.debug("not reusing files of %s: %r", sibling, e)
            continue
        if manifest is None:
            continue
        for rel, stored in _unchanged(fs, sibling, manifest, wanted, found).items():
            found[rel] = stored
    logger.debug("upload to %s: %d of %d files are copied from checkpoints next to it",
                 uri, len(found), len(hashes))
    return found


def _unchanged(
    fs: fsspec.AbstractFileSystem, sibling: str, manifest: CommitRecord,
    wanted: Mapping[tuple[str, int], str], found: Mapping[str, str],
) -> dict[str, str]:
    out: dict[str, str] = {}
    for rel, file_hash in manifest.hashes.items():
        target = wanted.get((file_hash, manifest.files.get(rel, -1)))
        token = manifest.tokens.get(rel)
        if target is None or target in found or token is None:
            continue
        stored = join(sibling, manifest.stored(rel))
        try:
            current = object_token(fs, stored)
        except (OSError, ValueError):
            continue
        if current == token:
            out[target] = stored
        else:
            logger.info("not copying %s: it was written after its checkpoint's commit", stored)
    return out


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
        The storage back-end failed (see :mod:`._fs`).
    """
    fs, root = resolve_uri(uri, storage_options)
    fs.invalidate_cache(root)
    commit_path, pending_path = join(root, COMMIT_MARKER), join(root, PENDING_MARKER)
    manifest = read_commit_or_none(fs, root, uri)
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
