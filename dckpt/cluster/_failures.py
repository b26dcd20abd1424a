"""Whether a failed source of a checkpoint is worth following with the next one.

Resolution (:meth:`dckpt.cluster._store.NodeStore.materialize`) tries holders, then
URIs. A failure moves on only when another source could do better
(:func:`fixable_elsewhere`); what no other source can fix is raised at once, naming
this node (:func:`raise_unless_fixable_elsewhere`).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from dckpt.cluster._cache_budget import MAX_BYTES_SETTING, MAX_BYTES_VARIABLE
from dckpt.cluster._core import NodeRef
from dckpt.errors import (
    CacheFullError,
    CheckpointError,
    CheckpointFormatError,
    CorruptChunkError,
)

__all__ = ["describe", "fixable_elsewhere", "raise_unless_fixable_elsewhere"]


# Errors of this node's disk: the next source would need the same room.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def fixable_elsewhere(error: BaseException) -> bool:
    """Whether another holder or a URI might succeed where this source failed.

    Yes for what is about the source or the way there: a lost or refused connection,
    a store that is gone or does not answer (``OSError``, ``TimeoutError``), a holder
    that no longer has it or failed to read it (reported as a
    :class:`~dckpt.errors.CheckpointError`), a chunk damaged on the way
    (:class:`~dckpt.errors.CorruptChunkError`). No for what is about this node or
    the data itself: its cache too small (:class:`~dckpt.errors.CacheFullError`) or
    its disk full, a manifest with unsafe or malformed entries
    (:class:`~dckpt.errors.CheckpointFormatError`, which a copy elsewhere shares),
    and everything else (bad settings, programming errors).
    """
    if isinstance(error, CacheFullError):
        return False
    if isinstance(error, CorruptChunkError):
        return True
    if isinstance(error, CheckpointFormatError):
        return False
    if isinstance(error, OSError):
        # A remote failure arrives as a message (no errno): an errno is this node's.
        return error.errno not in _DISK_FULL
    return isinstance(error, (CheckpointError, asyncio.TimeoutError))


def raise_unless_fixable_elsewhere(
    error: Exception, ref: NodeRef, here: str, source: str
) -> None:
    """Raise ``error`` (naming this node) if no other source can fix it; else return."""
    if fixable_elsewhere(error):
        return
    doing = (f"node {here} copying checkpoint {ref.checkpoint_id} of node {ref.node_id} "
             f"({ref.size} bytes) from {source}")
    if isinstance(error, CacheFullError):
        raise CacheFullError(f"{doing}: {error}") from error
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        raise CacheFullError(
            f"{doing}: the disk of the node cache is full ({error}). Free space there, "
            f"or lower `{MAX_BYTES_SETTING}` ({MAX_BYTES_VARIABLE}) on the workers to what "
            "the disk can hold."
        ) from error
    if isinstance(error, CheckpointError):
        try:
            renamed: Exception | None = type(error)(f"{doing}: {error}")
        except Exception:  # noqa: BLE001 - a constructor of another shape: as it is
            renamed = None
        if renamed is None:
            raise error
        raise renamed from error
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(f"while {doing}")
    raise error


def describe(error: Any) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:500]
