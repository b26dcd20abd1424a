"""What the things in a node cache folder are called, and what a name tells.

- a cached checkpoint: ``{id}-{digest}-{hash}`` (:func:`entry_dirname`), a single plain
  component whatever the id;
- hidden leftovers, named after the process that made them
  (:func:`owned_sibling`): ``.{hint}.{pid}.{token}.partial`` for a staging directory,
  ``.{hint}.{pid}.{token}.evicted`` for a directory set aside to delete. A cache
  starting on the folder removes only those whose process is gone
  (:func:`owner_is_alive`);
- per-checkpoint files (pins, transfer locks): :func:`checkpoint_key`, without dots.
"""

from __future__ import annotations

import hashlib
import os
import re

from dckpt._formats import partial_sibling
from dckpt._locks import is_alive

__all__ = [
    "STAGING_TAG",
    "TRASH_TAG",
    "checkpoint_key",
    "entry_dirname",
    "is_leftover",
    "owned_sibling",
    "owner_is_alive",
]

# Hidden siblings (see dckpt._formats._atomic.partial_sibling): directories being
# written, and directories evicted but not yet deleted. Never entries of the index.
STAGING_TAG = "partial"
TRASH_TAG = "evicted"
_LEFTOVER_SUFFIXES = (f".{STAGING_TAG}", f".{TRASH_TAG}")

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]")
_READABLE_ID_CHARS = 40


def entry_dirname(checkpoint_id: str, digest: str) -> str:
    """``<id, sanitized>-<digest[:12], sanitized>-<hash of both>``: one plain component.

    The sanitized parts are for people reading a listing; the hash keeps ids that
    sanitize alike (``a/b``, ``a:b``) and digests that share a prefix apart.
    """
    digest_part = _UNSAFE_CHARACTERS.sub("_", digest[:12]) or "none"
    tag = _hash(f"{checkpoint_id}\x00{digest}")
    return f"{_readable(checkpoint_id)}-{digest_part}-{tag}"


def checkpoint_key(checkpoint_id: str) -> str:
    """``<id, sanitized>-<hash of id>``: a file name for a checkpoint, without dots."""
    return f"{_readable(checkpoint_id)}-{_hash(checkpoint_id)}"


def owned_sibling(root: str, hint: str, tag: str) -> str:
    """A fresh hidden name in ``root`` that names this process: ``.{hint}.{pid}.{token}.{tag}``."""
    return partial_sibling(os.path.join(root, f"{_readable(hint)}.{os.getpid()}"), tag)


def is_leftover(name: str) -> bool:
    """Whether ``name`` is a staging directory or one set aside to delete."""
    return name.startswith(".") and name.endswith(_LEFTOVER_SUFFIXES)


def owner_is_alive(leftover: str) -> bool:
    """Whether the process named by :func:`owned_sibling` in ``leftover`` still runs.

    Leftovers that name no process (``.{name}.{token}.{tag}``, written before names
    held one, or by another module) count as dead.
    """
    parts = leftover.rsplit(".", 3)  # ".hint", pid, token, tag
    return (
        len(parts) == 4 and len(parts[0]) > 1 and parts[1].isdigit() and is_alive(int(parts[1]))
    )


def _readable(checkpoint_id: str) -> str:
    return _UNSAFE_CHARACTERS.sub("_", checkpoint_id[:_READABLE_ID_CHARS]) or "checkpoint"


def _hash(text: str) -> str:
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()[:16]
