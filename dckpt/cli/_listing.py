"""What a checkpoint holds, read without unpickling anything.

Each kind of place is read with the least it takes: a directory is walked; a folder
at a URI is listed from its commit manifest (or a listing of a plain folder) and
only the control files asked for are fetched; a bytes file is streamed through
:class:`~dckpt._formats.ArchiveReader`, which checks every checksum on the way (so a
damaged file is detected) and keeps the payloads of the control files asked for only.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field

from dckpt import _storage
from dckpt._formats import ArchiveReader
from dckpt.cli._places import Place


@dataclass
class Listing:
    """The files of a checkpoint and the raw bytes of the control files read.

    ``files`` maps ``/``-separated relative paths to sizes; ``links`` symlinks to their
    targets; ``directories`` the folders known to exist (empty ones included where the
    place records them). ``stored_bytes`` is the size of a bytes file and
    ``packed_version`` its packed format version; ``status`` the state of a folder at
    a URI (``"committed"`` or ``"plain"``).
    """

    files: dict[str, int] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    directories: set[str] = field(default_factory=set)
    contents: dict[str, bytes] = field(default_factory=dict)
    stored_bytes: int | None = None
    packed_version: int | None = None
    status: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def list_place(place: Place, read: Collection[str]) -> Listing:
    """List ``place`` and read the top-level files named in ``read`` (if present).

    Raises what the readers raise: :class:`~dckpt.errors.CheckpointFormatError` for a
    damaged bytes file, :class:`~dckpt.errors.CheckpointNotFoundError` for nothing at
    a URI, :class:`~dckpt.errors.IncompleteCheckpointError` for an unfinished upload.
    """
    if place.kind == "directory":
        return _list_directory(place.location, read)
    if place.kind == "uri":
        return _list_uri(place, read)
    return _list_bytes_file(place.location, read)


def _list_directory(root: str, read: Collection[str]) -> Listing:
    listing = Listing()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = prefix + name
            if os.path.islink(path):
                listing.links[rel] = os.readlink(path)
            elif name in dirnames:
                listing.directories.add(rel)
            else:
                listing.files[rel] = os.path.getsize(path)
    for name in read:
        if name in listing.files:
            with open(os.path.join(root, name), "rb") as f:
                listing.contents[name] = f.read()
    return listing


def _list_uri(place: Place, read: Collection[str]) -> Listing:
    options = place.storage_options
    status = _storage.uri_status(place.location, storage_options=options)
    listing = Listing(status=status)
    listing.files = _storage.list_files(place.location, storage_options=options)
    listing.directories = {
        rel.rsplit("/", i)[0] for rel in listing.files for i in range(1, rel.count("/") + 1)
    }
    for name in read:
        if name in listing.files:
            raw = _storage.read_file(place.location, name, storage_options=options)
            if raw is not None:
                listing.contents[name] = raw
    return listing


def _list_bytes_file(path: str, read: Collection[str]) -> Listing:
    listing = Listing(stored_bytes=os.path.getsize(path))
    with open(path, "rb") as f:
        reader = ArchiveReader(f)
        listing.packed_version = reader.version
        for entry in reader:
            if entry.kind == "directory":
                listing.directories.add(entry.path)
            elif entry.kind == "symlink":
                assert entry.target is not None
                listing.links[entry.path] = entry.target
            else:
                listing.files[entry.path] = entry.size
                if entry.path in read:
                    listing.contents[entry.path] = reader.read_payload()
    return listing
