"""The checkpoint manager's state file beside its checkpoints: JSON only, written atomically.

``{storage_uri}/dckpt_manager_state.json`` holds what a new driver needs to carry on
after a full restart (:meth:`dckpt.train.CheckpointManager.restore`): the format
version, the configuration (without storage options), the next index, the latest
index, and for each kept checkpoint its index, metrics and the URI it is persisted at
(``null`` until it is). Nothing in it is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from dckpt import _storage
from dckpt._formats import atomic_file, load_json
from dckpt.errors import CheckpointFormatError, CheckpointNotFoundError

__all__ = ["STATE_FILE", "STATE_FORMAT", "STATE_VERSION", "read_state", "write_state"]

STATE_FILE = "dckpt_manager_state.json"
STATE_FORMAT = "dckpt-checkpoint-manager"
STATE_VERSION = 1


def state_uri(storage_uri: str) -> str:
    return f"{storage_uri.rstrip('/')}/{STATE_FILE}"


def write_state(
    storage_uri: str, state: Mapping[str, Any], storage_options: Mapping[str, Any] | None
) -> None:
    """Write ``state`` (plus format and version) to the state file at ``storage_uri``.

    Local disk: into a hidden sibling, then renamed over the old file. Other stores:
    one put, which object stores apply whole or not at all.
    """
    data = json.dumps(
        {"format": STATE_FORMAT, "format_version": STATE_VERSION, **state}, indent=1
    ).encode()
    if _storage.is_local_uri(storage_uri):
        target = os.path.join(_storage.local_path_of(storage_uri), STATE_FILE)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with atomic_file(target, fsync=True) as f:
            f.write(data)
        return
    fs, path = _storage.resolve_uri(state_uri(storage_uri), storage_options)
    fs.pipe_file(path, data)


def read_state(storage_uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The state written by :func:`write_state` at ``storage_uri``.

    Raises
    ------
    CheckpointNotFoundError
        There is no state file at ``storage_uri``.
    CheckpointFormatError
        It is not JSON, not a manager's state, or of a newer format version.
    """
    uri = state_uri(storage_uri)
    fs, path = _storage.resolve_uri(uri, storage_options)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(
            f"no checkpoint manager state at {uri}: was a CheckpointManager with "
            f"storage_uri={storage_uri!r} ever run?"
        ) from e
    state = load_json(raw, f"the checkpoint manager state at {uri}")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointFormatError(
            f"{uri} is not a checkpoint manager state (expected a JSON object with "
            f'"format": "{STATE_FORMAT}")'
        )
    version = state.get("format_version")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise CheckpointFormatError(
            f"the checkpoint manager state at {uri} has format version {version!r}; this "
            f"dckpt reads version {STATE_VERSION} and older: upgrade dckpt"
        )
    return _checked(state, uri)


def _checked(state: dict[str, Any], uri: str) -> dict[str, Any]:
    """``state`` if its fields have the expected types; else CheckpointFormatError."""
    entries = state.get("checkpoints")
    problems = [
        name for name, ok in (
            ("config", isinstance(state.get("config"), dict)),
            ("next_index", _is_int(state.get("next_index"))),
            ("latest_index", state.get("latest_index") is None
             or _is_int(state.get("latest_index"))),
            ("checkpoints", isinstance(entries, list) and all(
                isinstance(e, dict) and _is_int(e.get("index"))
                and isinstance(e.get("metrics"), dict)
                and (e.get("uri") is None or isinstance(e.get("uri"), str))
                for e in entries
            )),
        ) if not ok
    ]
    if problems:
        raise CheckpointFormatError(
            f"the checkpoint manager state at {uri} is damaged: {', '.join(problems)} "
            "missing or of the wrong type"
        )
    return state


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
