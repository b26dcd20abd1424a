"""The marker protocol that uploads, reads and deletes at a URI all follow.

A checkpoint at a URI is a folder (a key prefix, on object stores) of the user's
files, as another tool would have uploaded them, plus two markers at its top:

- :data:`PENDING_MARKER` (``.dckpt_pending``): an upload is under way, or failed. It
  lists every file, relative to the folder, that the checkpoint being replaced had
  (``"replaces"``) and that this upload writes (``"uploading"``), so that a later
  upload or :func:`~dckpt._storage.delete` can clean up after a failed one.
- :data:`COMMIT_MARKER` (``.dckpt_commit``): the manifest of the committed
  checkpoint, a JSON document::

      {"format_version": 2, "version": "<hex>", "prefix": "",
       "files": {relpath: size, ...}, "modes": {relpath: 0o640, ...},
       "dirs": [relpath, ...], "hashes": {relpath: hex, ...},
       "tokens": {relpath: str, ...}}

  ``version`` is new for every upload; ``prefix`` is the folder, relative to the
  checkpoint's, that holds the files (``""``: the top); ``modes`` are the permission
  bits (``0o777``) of the files uploaded from a local directory; ``dirs`` are the
  empty folders, which object stores cannot hold on their own. ``hashes`` (the
  files' xxh3-128 content hashes, when the uploader gave them) and ``tokens`` (what
  each stored object looked like when committed) are optional: they let a later
  upload next to this one copy files from here (:mod:`._write`). Format 1 (earlier
  dckpt) had neither ``version``, ``prefix`` nor ``modes`` and is still
  read: its files are at the top, its version is a hash of the marker.

An upload:

1. writes the pending marker; the old commit marker stays, so readers keep reading
   the old checkpoint;
2. uploads the files, in parallel: to the top if no committed checkpoint is there,
   else under a fresh :data:`VERSIONS_FOLDER` ``/<version>/``, next to the old files;
3. writes the commit marker (the switch: one ``PUT`` of a small object, a rename on
   local disks);
4. if the files went under ``.dckpt_versions/<version>/``: removes the old files,
   copies the new ones to the top (server-side on object stores), switches the commit
   marker to them (``"prefix": ""``, same version) and removes the versioned copies;
5. removes every other file that a marker listed, then the pending marker.

So an interrupted overwrite leaves the old checkpoint readable (before step 3) or the
new one (after it), never neither; and once an upload is complete, the folder is a
plain folder of the user's files plus the markers, which any tool can read. The price
of that is one server-side copy of each file when a checkpoint is overwritten.

Readers go by the markers (:func:`~dckpt._storage.uri_status`): a commit marker means
a finished upload, whose files are exactly those its manifest lists (stale files are
never listed, even before they are removed); a pending marker without a commit marker
means an upload that never finished, which is refused; a folder without markers was
uploaded by some other tool and is accepted as it is, as Ray AIR does. A plain
folder is overwritten in place (it reads as an unfinished upload meanwhile).

Every relative path that comes from a listing or a manifest passes
:func:`~dckpt._formats._paths.safe_relpath` before anything is written locally.

This module holds what the steps share: the markers' names, reading them, writing
them, and what a folder holds when no marker says (a listing, for plain folders and
clean-up). The steps themselves are in :mod:`._write` (upload, delete) and
:mod:`._read`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from dckpt._formats import load_json, safe_relpath
from dckpt.errors import CheckpointFormatError

logger = logging.getLogger(__name__)

PENDING_MARKER = ".dckpt_pending"


COMMIT_MARKER = ".dckpt_commit"


MARKERS = frozenset({PENDING_MARKER, COMMIT_MARKER})


# Where an overwrite stages the new files while the old checkpoint stays readable.
VERSIONS_FOLDER = ".dckpt_versions"


FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """A parsed commit marker; ``files``, ``modes`` and ``dirs`` are relative to the
    checkpoint's folder, ``prefix`` is where they are stored (see the module).

    Not the transfer's :class:`dckpt._transfer.Manifest`, on purpose: that one says
    what a local directory holds (symlinks, content ids, the digest a node reference
    is checked against) and never leaves dckpt's processes; this one is what a folder
    at a URI holds as stored objects (where, which upload, each object's token), read
    by anyone who opens the folder. ``hashes`` are the transfer manifest's content
    hashes, so the two agree on what a file is.
    """

    version: str
    prefix: str
    files: dict[str, int]
    modes: dict[str, int]
    dirs: list[str]
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)

    def stored(self, rel: str) -> str:
        """Where the file ``rel`` of the checkpoint is stored, relative to its folder."""
        return join_rel(self.prefix, rel)


def is_reserved(rel: str) -> bool:
    """Whether the relative path ``rel`` is dckpt's (a marker, a staged version)."""
    return rel in MARKERS or rel == VERSIONS_FOLDER or rel.startswith(VERSIONS_FOLDER + "/")


def new_version() -> str:
    return uuid.uuid4().hex


def read_commit(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> CommitRecord:
    """The commit marker of the checkpoint at ``root``; ``FileNotFoundError`` if none."""
    raw = fs.cat_file(join(root, COMMIT_MARKER))
    doc = load_json(raw, f"the commit marker at {uri}")
    try:
        version = doc["format_version"]
        files = {safe_relpath(rel): int(size) for rel, size in doc["files"].items()}
        modes = {safe_relpath(rel): int(mode) & 0o777
                 for rel, mode in doc.get("modes", {}).items()}
        dirs = [safe_relpath(rel) for rel in doc.get("dirs", [])]
        hashes = {safe_relpath(rel): str(h) for rel, h in doc.get("hashes", {}).items()}
        tokens = {safe_relpath(rel): str(t) for rel, t in doc.get("tokens", {}).items()}
        prefix = str(doc.get("prefix", ""))
        if prefix:
            prefix = safe_relpath(prefix)
        # Format 1 had no version of its own: any change of the marker is a new one.
        content_version = str(doc.get("version") or hashlib.sha256(raw).hexdigest())
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
    if (any(map(is_reserved, files)) or any(size < 0 for size in files.values())
            or (prefix and not is_reserved(prefix))):
        raise CheckpointFormatError(f"the commit marker at {uri} lists impossible files")
    return CommitRecord(content_version, prefix, files, modes, dirs, hashes, tokens)


def read_commit_or_none(
    fs: fsspec.AbstractFileSystem, root: str, uri: str
) -> CommitRecord | None:
    """:func:`read_commit`, ``None`` when there is no commit marker."""
    try:
        return read_commit(fs, root, uri)
    except FileNotFoundError:
        return None


def write_commit(fs: fsspec.AbstractFileSystem, root: str, manifest: CommitRecord) -> None:
    """Write the commit marker in one step: a single ``PUT`` on object stores and
    ``memory://``, a write to a sibling and a rename on local disks (where
    ``pipe_file`` would truncate the old marker first)."""
    doc = {"format_version": FORMAT_VERSION, "version": manifest.version,
           "prefix": manifest.prefix, "files": dict(sorted(manifest.files.items())),
           "modes": dict(sorted(manifest.modes.items())), "dirs": manifest.dirs}
    if manifest.hashes:
        doc["hashes"] = dict(sorted(manifest.hashes.items()))
    if manifest.tokens:
        doc["tokens"] = dict(sorted(manifest.tokens.items()))
    path = join(root, COMMIT_MARKER)
    if isinstance(fs, LocalFileSystem):
        partial = join(root, f"{VERSIONS_FOLDER}/.commit.{new_version()}.partial")
        fs.makedirs(join(root, VERSIONS_FOLDER), exist_ok=True)
        fs.pipe_file(partial, dump_marker(doc))
        fs.mv(partial, path)
    else:
        fs.pipe_file(path, dump_marker(doc))


def files_of_pending(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> set[str]:
    """The files an unfinished upload replaced or wrote (relative to ``root``, where
    they are stored), by its pending marker."""
    try:
        doc = load_json(fs.cat_file(join(root, PENDING_MARKER)), f"the pending marker at {uri}")
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


def join_rel(prefix: str, rel: str) -> str:
    """``rel`` below the relative folder ``prefix`` (``""``: the top)."""
    return f"{prefix}/{rel}" if prefix else rel


def dump_marker(doc: Mapping[str, Any]) -> bytes:
    """The bytes of a marker (pending or commit) holding ``doc``."""
    return json.dumps(doc, indent=1, sort_keys=True).encode()


# Filesystems where a folder exists apart from the files in it (and may be empty).
FOLDERS_OF_THEIR_OWN = (LocalFileSystem, MemoryFileSystem)


def listing(
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
        if is_reserved(rel.rstrip("/")):
            continue
        if rel.endswith("/"):
            # A folder marker object ("d/", as the S3 console makes them): a folder.
            dirs.add(safe_relpath(rel))
        else:
            files[safe_relpath(rel)] = int(info.get("size") or 0)
    if isinstance(fs, FOLDERS_OF_THEIR_OWN):
        # Empty folders exist only here; on object stores folders are implied by keys.
        for name, info in fs.find(root, withdirs=True, detail=True).items():
            if (info.get("type") == "directory" and name.startswith(prefix)
                    and not is_reserved(name[len(prefix):])):
                dirs.add(safe_relpath(name[len(prefix):]))
    return files, sorted(dirs)


def file_paths(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Full paths of the files below ``root``, markers included, names unchecked."""
    prefix = root.rstrip("/") + "/"
    return [name for name in fs.find(root) if name.startswith(prefix)]


def has_files(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether any file other than dckpt's (markers, staged versions) lies below ``root``."""
    prefix = root.rstrip("/") + "/"
    return any(not is_reserved(name[len(prefix):]) for name in file_paths(fs, root))


def fingerprint(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """A string that changes when a file below ``root`` is added, removed or rewritten:
    names, sizes and whatever the store says about the content or its age."""
    prefix = root.rstrip("/") + "/"
    entries = []
    for name, info in sorted(fs.find(root, detail=True).items()):
        if name.startswith(prefix) and not is_reserved(name[len(prefix):]):
            stamp = next((info[key] for key in ("ETag", "mtime", "LastModified", "created")
                          if info.get(key) is not None), None)
            entries.append((name[len(prefix):], info.get("size"), str(stamp)))
    return repr(entries)


def remove_empty_folders(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove the folders below ``root``, and ``root``, that hold nothing any more.

    Only where folders exist on their own; object stores have none to remove.
    """
    if not isinstance(fs, FOLDERS_OF_THEIR_OWN) or not fs.exists(root):
        return
    folders = [
        name for name, info in fs.find(root, withdirs=True, detail=True).items()
        if info.get("type") == "directory"
    ]
    for folder in sorted(set(folders) | {fs._strip_protocol(root)}, key=len, reverse=True):
        # OSError: not empty (someone else's files are left alone) or already gone.
        with contextlib.suppress(OSError):
            fs.rmdir(folder)
