"""Files an upload need not send: the same bytes in an earlier checkpoint next to it.

A run persists its checkpoints side by side (``s3://bucket/run/step-0009``,
``.../step-0010``), and most of their files are often the same bytes (frozen weights,
tokenizers). When the caller of :func:`~dckpt._storage.upload_directory` gives each
file's content hash, the commit marker records them, and a later upload next to it
copies a file with the same hash and size from there (``fs.cp_file``: a server-side
copy on object stores, no byte through this process) instead of uploading it.

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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import dask.config
import fsspec

from dckpt._storage._protocol import Manifest, join, read_manifest_or_none

__all__ = ["SIBLINGS_SETTING", "object_token", "reusable_files"]

logger = logging.getLogger(__name__)

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
            manifest = read_manifest_or_none(fs, sibling, sibling)
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
    fs: fsspec.AbstractFileSystem, sibling: str, manifest: Manifest,
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
