"""The manifest of a directory: what files, folders and symlinks it holds, and a digest.

A manifest is built on the sender (:func:`build_manifest`, with each file's content
hash, see :mod:`._hashes`) and travels as plain data (:meth:`Manifest.to_dict`); the
receiver checks it as hostile input (:meth:`Manifest.from_dict`, which also recomputes
the digest from the entries) before it creates anything, and checks each file it
wrote against its hash (:mod:`._receive`).

The digest is the identity of the content: two directories with the same relative
paths, sizes, modes, link targets and file bytes have the same digest wherever they
are, and a changed byte gives another. :attr:`Manifest.content_id` is its short form,
the checkpoint id of dckpt's node references.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dckpt._formats import EntryIndex, plan_tree, safe_relpath
from dckpt._transfer._hashes import HASH_HEX_LENGTH, file_hash
from dckpt._transfer._settings import check_chunk_bytes
from dckpt.errors import CheckpointFormatError

__all__ = ["ChunkSpec", "FileEntry", "Manifest", "build_manifest", "content_digest"]

# 2: chunk frames carry xxh3_64 (17-byte header) instead of crc32.
# 3: every file carries its xxh3-128 hash; the digest is of the content.
# A manifest opens every transfer, so its version is where two dckpt releases find out
# they differ.
MANIFEST_VERSION = 3

_MAX_FILE_BYTES = (1 << 63) - 1  # off_t
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FILE_HASH = re.compile(r"[0-9a-f]{%d}" % HASH_HEX_LENGTH)
#: Hex digits of :attr:`Manifest.content_id` (128 bits).
CONTENT_ID_LENGTH = 32


@dataclass(frozen=True)
class FileEntry:
    """A regular file of a manifest: relative POSIX path, size in bytes, permission
    bits, and the xxh3-128 hash (hex) of its bytes."""

    path: str
    size: int
    mode: int
    hash: str


@dataclass(frozen=True)
class ChunkSpec:
    """``length`` bytes at ``offset`` of the manifest's file number ``file_index``."""

    file_index: int
    offset: int
    length: int


@dataclass(frozen=True)
class Manifest:
    """What a directory holds, in the order it is sent.

    Attributes
    ----------
    files
        Regular files (symlinks that lead outside the tree are dereferenced, as
        ``shutil.copytree`` does). ``ChunkSpec.file_index`` indexes this tuple.
    directories
        Every directory, so that empty ones survive the copy. Their modes are not
        kept: the receiver creates them with the default mode.
    symlinks
        ``(path, target)`` of symlinks whose relative target stays inside the tree;
        they are recreated as links.
    digest
        The identity of the content (hex sha256), computed from the entries; see
        :func:`content_digest`.
    """

    files: tuple[FileEntry, ...]
    directories: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]
    digest: str

    @property
    def content_id(self) -> str:
        """The first 32 hex digits of :attr:`digest`: a short name of the content."""
        return self.digest[:CONTENT_ID_LENGTH]

    @property
    def total_bytes(self) -> int:
        """The sum of the file sizes."""
        return sum(entry.size for entry in self.files)

    def chunks(self, chunk_bytes: int) -> list[ChunkSpec]:
        """Every file cut into pieces of ``chunk_bytes`` (the last one shorter).

        Files in manifest order, each from its start; empty files get no chunk.
        """
        chunk_bytes = check_chunk_bytes(chunk_bytes)
        return [
            ChunkSpec(index, offset, min(chunk_bytes, entry.size - offset))
            for index, entry in enumerate(self.files)
            for offset in range(0, entry.size, chunk_bytes)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, ints and strings, for msgpack (Dask's comms) or JSON."""
        return {
            "format_version": MANIFEST_VERSION,
            "files": [[entry.path, entry.size, entry.mode, entry.hash] for entry in self.files],
            "directories": list(self.directories),
            "symlinks": [[path, target] for path, target in self.symlinks],
            "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """The manifest that :meth:`to_dict` returned, checked as coming from outside.

        Raises
        ------
        UnsafePathError
            An entry would land outside the target directory: ``..``, an absolute
            path, a symlink leading out, an entry below a symlink.
        CheckpointFormatError
            Anything else malformed: unknown or missing keys, wrong types, negative
            sizes, modes beyond ``0o7777``, file hashes that are not 32 hex digits,
            duplicate entries, entries below a file, a digest that is not the one
            of the entries.
        """
        if not isinstance(d, Mapping):
            raise _malformed(f"expected a mapping, got {type(d).__name__}")
        expected = {"format_version", "files", "directories", "symlinks", "digest"}
        if set(d) != expected:
            raise _malformed(
                f"expected the keys {sorted(expected)}, got {sorted(map(str, d))}"
            )
        if d["format_version"] != MANIFEST_VERSION or isinstance(d["format_version"], bool):
            raise _malformed(
                f"format_version {d['format_version']!r} is not {MANIFEST_VERSION}; "
                "sender and receiver run different dckpt versions"
            )
        digest = d["digest"]
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise _malformed(f"digest {digest!r} is not a hex sha256")
        files = tuple(
            FileEntry(safe_relpath(path), _int(size, "size", _MAX_FILE_BYTES),
                      _int(mode, "mode", 0o7777), _file_hash(file_hash_))
            for path, size, mode, file_hash_ in _rows(d["files"], "files", 4)
        )
        directories = tuple(safe_relpath(path) for path in _items(d["directories"], "directories"))
        symlinks = tuple(
            (safe_relpath(path), _str(target, "symlink target"))
            for path, target in _rows(d["symlinks"], "symlinks", 2)
        )
        index = EntryIndex()
        for name in directories:
            index.add(name, "directory")
        for entry in files:
            index.add(entry.path, "file")
        for name, target in symlinks:
            index.add(name, "symlink", target)
        computed = content_digest(files, directories, symlinks)
        if digest != computed:
            raise _malformed(
                f"digest {digest[:12]}... is not the digest of its entries ({computed[:12]}...)"
            )
        return cls(files, directories, symlinks, digest)


def _malformed(problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"malformed transfer manifest: {problem}; it must come from Manifest.to_dict()"
    )


def _items(value: object, what: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _malformed(f"{what} is a {type(value).__name__}, not a list")
    return list(value)


def _rows(value: object, what: str, width: int) -> list[Any]:
    rows = _items(value, what)
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != width:
            raise _malformed(f"{what} holds {row!r}, not a list of {width} items")
    return rows


def _int(value: object, what: str, maximum: int) -> int:
    # bool is an int subclass; True is no size.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise _malformed(f"{what} {value!r} is not an integer in [0, {maximum}]")
    return value


def _file_hash(value: object) -> str:
    if not isinstance(value, str) or not _FILE_HASH.fullmatch(value):
        raise _malformed(f"file hash {value!r} is not {HASH_HEX_LENGTH} hex digits")
    return value


def content_digest(
    files: tuple[FileEntry, ...],
    directories: tuple[str, ...],
    symlinks: tuple[tuple[str, str], ...],
) -> str:
    """The hex sha256 of the sorted entries: paths, sizes, modes, hashes, link targets.

    Nothing of where the directory is, of its mtimes or owners: a copy anywhere has
    the same digest. Directory modes are not kept by a transfer, so they are not part
    of it either.
    """
    identity: list[list[Any]] = [["f", e.path, e.size, e.mode, e.hash] for e in files]
    identity += [["d", name] for name in directories]
    identity += [["l", name, target] for name, target in symlinks]
    identity.sort()
    return hashlib.sha256(json.dumps(identity).encode("utf-8")).hexdigest()


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _malformed(f"{what} {value!r} is not a string")
    return value


def build_manifest(
    root: str | os.PathLike[str], *, exclude: Callable[[str], bool] | None = None
) -> Manifest:
    """The manifest of the directory ``root``, with a content hash of every file.

    The walk is that of the packed format (:func:`~dckpt._formats._tree.plan_tree`):
    sorted, in-tree relative symlinks kept as links, others dereferenced, special files
    and directory cycles skipped with a warning.

    Each file is hashed with xxh3-128 (:func:`~dckpt._transfer._hashes.file_hash`),
    once per version of the file: building the manifest of the same directory again
    reads no byte, unless a file was written (or its mode changed) since. The first
    build reads everything, at about 0.12 s per GiB in the page cache (see
    :mod:`dckpt._transfer._hashes` for the measurement). The digest is of the content
    (:func:`content_digest`): copies anywhere have the same one, a changed byte gives
    another.

    Parameters
    ----------
    root
        An existing directory.
    exclude
        Called with each path relative to ``root``; ``True`` drops the entry and, for a
        directory, everything below it.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        if not os.path.exists(root):
            raise FileNotFoundError(f"cannot build a manifest of {root!r}: it does not exist")
        raise NotADirectoryError(f"cannot build a manifest of {root!r}: not a directory")
    files: list[FileEntry] = []
    directories: list[str] = []
    symlinks: list[tuple[str, str]] = []
    for kind, relpath, value in plan_tree(root, exclude):
        if kind == "file":
            assert isinstance(value, str)
            st = os.stat(value)
            files.append(FileEntry(relpath, st.st_size, stat.S_IMODE(st.st_mode) & 0o777,
                                   file_hash(value, st)))
        elif kind == "directory":
            directories.append(relpath)
        else:
            assert isinstance(value, str)
            symlinks.append((relpath, value))
    entries = (tuple(files), tuple(directories), tuple(symlinks))
    return Manifest(*entries, content_digest(*entries))
