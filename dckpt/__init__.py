"""dckpt: a distributed checkpoint manager for Dask, with Ray AIR's ``Checkpoint`` API.

>>> from dckpt import Checkpoint
>>> checkpoint = Checkpoint.from_dict({"data": 123})
>>> Checkpoint.from_directory(checkpoint.to_directory()).to_dict()
{'data': 123}
"""

from __future__ import annotations

from dckpt import _config  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt._checkpoint import Checkpoint, LargeInlineCheckpointWarning
from dckpt._node import node_id, node_root
from dckpt._put import put
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
    IsolationUnavailableError,
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
    "IsolationUnavailableError",
    "LargeInlineCheckpointWarning",
    "StorageError",
    "UnsafePathError",
    "UnsupportedRayClassError",
    "__version__",
    "node_id",
    "node_root",
    "put",
]

