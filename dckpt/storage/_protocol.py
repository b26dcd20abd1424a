"""The marker protocol that uploads, reads and deletes at a URI all follow.

A checkpoint at a URI is a folder (a key prefix, on object stores) of files. An upload
by dckpt brackets its files with two markers at the top of that folder:

1. :data:`PENDING_MARKER` is written first. It records which files the checkpoint being
   overwritten had (``"replaces"``) and which files this upload is about to write
   (``"uploading"``), so that a later upload or :func:`~dckpt.storage.delete` can
   clean up after a failed one.
2. The files are uploaded, in parallel (``dckpt.storage.max-concurrency`` threads).
3. :data:`COMMIT_MARKER` is written last: a JSON manifest
   ``{"format_version": 1, "files": {relpath: size, ...}, "dirs": [relpath, ...]}``.
   ``"dirs"`` lists the empty folders, which object stores cannot hold on their own.
4. The pending marker is removed, then the files that the overwritten checkpoint had
   and this one does not.

Readers go by the markers (:func:`~dckpt.storage.uri_status`): a commit marker means
a finished upload, whose files are exactly those its manifest lists (stale files are
never listed, even before they are removed); a pending marker without a commit marker
means an upload that never finished, which is refused; a folder without markers was
uploaded by some other tool and is accepted as it is, as Ray AIR does.

Every relative path that comes from a listing or a manifest passes
:func:`~dckpt.formats._paths.safe_relpath` before anything is written locally.

This module holds what the steps share: the markers' names, reading them, and
writing them. The steps themselves are in :mod:`._upload`, :mod:`._read` and
:mod:`._delete`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import fsspec

from dckpt.errors import CheckpointFormatError
from dckpt.formats._layout import load_json
from dckpt.formats._paths import safe_relpath

logger = logging.getLogger(__name__)

PENDING_MARKER = ".dckpt_pending"
COMMIT_MARKER = ".dckpt_commit"
MARKERS = frozenset({PENDING_MARKER, COMMIT_MARKER})
FORMAT_VERSION = 1


def read_marker(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> dict[str, Any]:
    """The parsed commit marker at ``path``; ``FileNotFoundError`` if there is none."""
    doc = load_json(fs.cat_file(path), f"the commit marker at {uri}")
    try:
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


def files_of_pending(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> set[str]:
    """The files an unfinished upload replaced or wrote, by its pending marker."""
    try:
        doc = load_json(fs.cat_file(path), f"the pending marker at {uri}")
        return {safe_relpath(rel) for key in ("replaces", "uploading") for rel in doc[key]}
    except FileNotFoundError:
        return set()
    except (ValueError, TypeError, KeyError) as e:
        # Not ours to clean up, then: only files a dckpt marker listed are removed.
        logger.warning("ignoring the unreadable pending marker at %s: %r", uri, e)
        return set()


def join(root: str, rel: str) -> str:
    """The path of ``rel`` below the folder ``root`` of a filesystem."""
    return f"{root.rstrip('/')}/{rel}"


def dump_marker(doc: Mapping[str, Any]) -> bytes:
    """The bytes of a marker (pending or commit) holding ``doc``."""
    return json.dumps(doc, indent=1, sort_keys=True).encode()
