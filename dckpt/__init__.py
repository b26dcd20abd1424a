"""dckpt: a distributed checkpoint manager for Dask, with Ray AIR's ``Checkpoint`` API.

>>> from dckpt import Checkpoint
>>> checkpoint = Checkpoint.from_dict({"data": 123})
>>> Checkpoint.from_directory(checkpoint.to_directory()).to_dict()
{'data': 123}
"""

from __future__ import annotations

from typing import Any

from dckpt import _config  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt.checkpoint import Checkpoint
from dckpt.errors import (
    CacheFullError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointUnavailableError,
    CheckpointURIError,
    CorruptChunkError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    UnsafePathError,
    UnsupportedRayClassError,
)

__version__ = "0.1.0"

__all__ = [
    "CacheFullError",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointUnavailableError",
    "CheckpointURIError",
    "CorruptChunkError",
    "IncompatibleCheckpointError",
    "IncompleteCheckpointError",
    "StorageError",
    "UnsafePathError",
    "UnsupportedRayClassError",
    "__version__",
    "put",
]


def __getattr__(name: str) -> Any:
    # dckpt.put needs distributed; import it only for those who use it.
    if name == "put":
        from dckpt.cluster import put

        return put
    raise AttributeError(f"module 'dckpt' has no attribute {name!r}")
