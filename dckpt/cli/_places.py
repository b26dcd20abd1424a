"""Where a checkpoint is: a local directory, a folder at a URI, or a bytes file.

Shared by ``inspect`` (which reads a place without unpickling) and ``cp`` (which
loads it through the :class:`~dckpt.Checkpoint` API).

How a place's kind is told:

- a source is a folder at a URI when it has a scheme other than ``file://`` or is a
  local folder with dckpt's upload markers (``.dckpt_commit``, ``.dckpt_pending``);
  else a local directory when it is one, a bytes file when it is a file;
- a destination is a bytes file when ``--to bytes`` is given or its name ends in
  ``.dckpt`` (unless ``--to directory``); else a folder at a URI when it has a scheme
  other than ``file://`` or ``--to uri`` is given (a local one then gets the URI
  layout, commit marker included); else a local directory. Bytes files are local.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from dckpt import _storage
from dckpt._checkpoint import Checkpoint
from dckpt.cli._output import CommandError
from dckpt.errors import CheckpointNotFoundError, IncompleteCheckpointError

Kind = Literal["directory", "uri", "bytes"]
KINDS: tuple[Kind, ...] = ("directory", "uri", "bytes")

#: The suffix that makes a destination a bytes file.
BYTES_SUFFIX = ".dckpt"


@dataclass(frozen=True)
class Place:
    """A checkpoint's kind and location (an absolute path, or the URI as given)."""

    kind: Kind
    location: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind} {self.location}"


def source(text: str, storage_options: dict[str, Any]) -> Place:
    """The place ``text`` names as a source; :class:`CommandError` if nothing is there."""
    if not _storage.is_local_uri(text):
        return Place("uri", text, storage_options)
    path = _storage.local_path_of(text)
    if os.path.isdir(path):
        if any(os.path.lexists(os.path.join(path, m)) for m in _storage.MARKERS):
            # What `cp --to uri` or _storage.upload_directory wrote to a local folder:
            # read as the folder at a URI it is (markers are no checkpoint files).
            return Place("uri", _file_uri(path), storage_options)
        return Place("directory", path)
    if os.path.exists(path):
        return Place("bytes", path)
    raise CommandError(f"{text}: no such file or directory")


def destination(text: str, to: Kind | None, storage_options: dict[str, Any]) -> Place:
    """The place ``text`` names as a destination (see the module's docstring)."""
    local = _storage.is_local_uri(text)
    if to is None:
        to = ("bytes" if text.endswith(BYTES_SUFFIX)
              else "directory" if local else "uri")
    if to == "bytes" and not local:
        raise CommandError(f"{text}: bytes files are written to local paths only")
    if to == "uri" and local:
        # Asked for: the URI layout (commit marker last) in a local folder, which
        # Checkpoint.to_uri does not write for file:// (it writes a directory).
        return Place("uri", _file_uri(_storage.local_path_of(text)), storage_options)
    return Place(to, _storage.local_path_of(text) if local else text, storage_options)


def _file_uri(path: str) -> str:
    return "file://" + os.path.abspath(path)


def load(place: Place) -> Checkpoint:
    """The checkpoint at ``place``, through the public constructors.

    This unpickles what those do (a bytes file's dict and preprocessor, a subclass's
    state): checkpoints are pickles, load only those you trust.
    """
    if place.kind == "directory":
        return Checkpoint.from_directory(place.location)
    if place.kind == "uri":
        return Checkpoint.from_uri(place.location, storage_options=place.storage_options)
    with open(place.location, "rb") as f:
        return Checkpoint.from_bytes(f.read())


def exists(place: Place) -> bool:
    """Whether something (a checkpoint or not) is at ``place`` already."""
    if place.kind != "uri":
        return os.path.lexists(place.location)
    try:
        _storage.uri_status(place.location, storage_options=place.storage_options)
    except IncompleteCheckpointError:
        return True
    except CheckpointNotFoundError:
        return False
    return True


def storage_option(text: str) -> tuple[str, Any]:
    """argparse type of ``--storage-option KEY=VALUE``.

    The value is read as JSON when it parses (``true``, ``3``, ``{"a": 1}``), else
    kept as a string; a dotted key (``client_kwargs.region_name``) sets a nested one.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def storage_options(pairs: list[tuple[str, Any]] | None) -> dict[str, Any]:
    """The nested dict of fsspec options that ``--storage-option`` pairs give."""
    options: dict[str, Any] = {}
    for key, value in pairs or ():
        *parents, leaf = key.split(".")
        level = options
        for parent in parents:
            level = level.setdefault(parent, {})
        level[leaf] = value
    return options


def add_storage_option_argument(parser: argparse.ArgumentParser) -> None:
    """``--storage-option KEY=VALUE`` (repeatable) on ``parser``."""
    parser.add_argument(
        "--storage-option", "-o", metavar="KEY=VALUE", type=storage_option,
        action="append", dest="storage_options",
        help="an fsspec option for URIs, e.g. endpoint_url=http://127.0.0.1:9000, "
             "anon=true or client_kwargs.region_name=eu-west-1 (values are read as "
             "JSON when they parse); repeat for more",
    )
