"""How a checkpoint is laid out as a directory, and what travels beside a dict.

A checkpoint is *files* plus a little *control state*. In a directory the control
state lives in these files (all other files are the user's):

``dict_checkpoint.pkl``
    the user's dict, pickled (Ray AIR's name; a dict checkpoint written as a directory);
``_preprocessor``
    the preprocessor, pickled (the ``"_preprocessor"`` key of the dict form);
``.dckpt.json``
    :class:`CheckpointHeader` as JSON: format version, checkpoint class, user metadata.
    Readable without unpickling anything;
``.dckpt_state.pkl``
    the values of a subclass's ``_SERIALIZED_ATTRS``, pickled.

In the dict form, everything that is not the user's data rides under the single key
:data:`RESERVED_KEY`, present only when there is something to carry:
``{"class": "pkg.mod:Cls", "state": {...}, "metadata": {...}, "files": <packed bytes>}``.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from dckpt.errors import CheckpointFormatError

DICT_FILE = "dict_checkpoint.pkl"
PREPROCESSOR_KEY = "_preprocessor"
PREPROCESSOR_FILE = PREPROCESSOR_KEY
HEADER_FILE = ".dckpt.json"
STATE_FILE = ".dckpt_state.pkl"
RESERVED_KEY = "_dckpt"

#: Files whose content dckpt derives from a checkpoint's control state.
CONTROL_FILES = frozenset({DICT_FILE, PREPROCESSOR_FILE, HEADER_FILE, STATE_FILE})

#: Version of the directory layout and of the reserved dict entry.
LAYOUT_VERSION = 1

_RESERVED_FIELDS = frozenset({"class", "state", "metadata", "files"})


@dataclass
class CheckpointHeader:
    """What ``.dckpt.json`` holds: readable without unpickling anything."""

    format_version: int = LAYOUT_VERSION
    checkpoint_class: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        document = {
            "format_version": self.format_version,
            "checkpoint_class": self.checkpoint_class,
            "metadata": self.metadata,
        }
        return json.dumps(document, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> CheckpointHeader:
        document = load_json(raw, source)
        if not isinstance(document, dict):
            raise CheckpointFormatError(f"{source} holds {type(document).__name__}, not an object")
        version = document.get("format_version")
        if not isinstance(version, int) or version > LAYOUT_VERSION:
            raise CheckpointFormatError(
                f"{source} has layout version {version!r}; this dckpt reads up to "
                f"{LAYOUT_VERSION}. Upgrade dckpt to read this checkpoint."
            )
        checkpoint_class = document.get("checkpoint_class")
        metadata = document.get("metadata") or {}
        if checkpoint_class is not None and not isinstance(checkpoint_class, str):
            raise CheckpointFormatError(f"{source}: checkpoint_class must be a string")
        if not isinstance(metadata, dict):
            raise CheckpointFormatError(f"{source}: metadata must be an object")
        return cls(version, checkpoint_class, metadata)


def check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Return a deep copy of ``metadata`` after checking it is JSON-serialisable.

    Raises ``TypeError`` (from :mod:`json`) for values JSON cannot hold.
    """
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
    try:
        copied: dict[str, Any] = json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
    return copied


def split_reserved(data: Mapping[Any, Any]) -> tuple[dict[Any, Any], dict[str, Any]]:
    """Split a dict form into the user's keys and the reserved entry (checked)."""
    user = dict(data)
    reserved = user.pop(RESERVED_KEY, None)
    if reserved is None:
        return user, {}
    if not isinstance(reserved, dict) or not set(reserved) <= _RESERVED_FIELDS:
        raise CheckpointFormatError(
            f"the {RESERVED_KEY!r} key of a checkpoint dict is reserved for dckpt and must "
            f"be a dict with keys among {sorted(_RESERVED_FIELDS)}; got {reserved!r:.200}"
        )
    return user, reserved


def read_header(directory: str) -> CheckpointHeader | None:
    """The header of a checkpoint directory, or ``None`` for a plain directory."""
    path = os.path.join(directory, HEADER_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    return CheckpointHeader.from_json(raw, path)


def load_json(raw: bytes | str, source: str) -> Any:
    """Parse a JSON document read from a file, a URI or a marker.

    Everything that can go wrong with bytes from outside raises
    :class:`~dckpt.errors.CheckpointFormatError` (a ``ValueError``): bytes that are not
    UTF-8, text that is not JSON, and documents nested too deeply for the parser
    (``"[" * 100_000``), where :mod:`json` raises ``RecursionError``. ``source`` names
    what was read, for the message.
    """
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _not_json(source, str(e)) from e
    except RecursionError as e:
        raise _not_json(source, "it is nested too deeply") from e


def _not_json(source: str, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{source} is not valid JSON ({problem}); it is damaged or was not written by dckpt"
    )


def dump_pickle(value: Any) -> bytes:
    """Pickle with cloudpickle, so preprocessors defined in ``__main__`` travel too."""
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def load_pickle(raw: bytes, source: str) -> Any:
    """Unpickle a control file. Checkpoints are pickles: load only those you trust.

    A pickle that may name Ray's modules (a checkpoint Ray AIR wrote) is read with
    Ray's names mapped to dckpt's (:func:`dckpt._formats.ray_format.load_pickle`).
    """
    from dckpt._formats import ray_format  # imports this module

    if ray_format.mentions_ray(raw):
        return ray_format.load_pickle(raw, source)
    try:
        return pickle.loads(raw)
    except (pickle.UnpicklingError, EOFError) as e:
        raise CheckpointFormatError(f"{source} is not a readable pickle: {e}") from e


def read_pickle_file(path: str) -> Any:
    with open(path, "rb") as f:
        return load_pickle(f.read(), path)
