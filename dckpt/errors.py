"""The exceptions dckpt raises.

Each type is chosen by what the caller should do about it, and each also subclasses
the built-in exception a caller already catches (``FileNotFoundError``,
``ValueError``), so code written for Ray AIR or plain Python keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CheckpointFormatError",
    "UnsafePathError",
    "CheckpointURIError",
    "IncompatibleCheckpointError",
]


class CheckpointError(Exception):
    """Base class of every error dckpt raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A directory or URI that should hold a checkpoint holds nothing."""


class IncompleteCheckpointError(CheckpointNotFoundError):
    """A URI holds a dckpt upload that never finished (no commit marker).

    A subclass of ``FileNotFoundError``: there is no *complete* checkpoint there, and a
    caller looking for the latest usable checkpoint should move on to an older one.
    """


class CheckpointFormatError(CheckpointError, ValueError):
    """Bytes or files that are not a dckpt checkpoint, or are damaged.

    Raised before anything is unpickled: headers, lengths and checksums are checked
    first.
    """


class UnsafePathError(CheckpointFormatError):
    """An archive or manifest entry would land outside the target directory."""


class CheckpointURIError(CheckpointError, ValueError):
    """A URI whose protocol fsspec does not know, or whose backend is not installed."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """Data saved by one ``Checkpoint`` subclass loaded through an unrelated one."""
