"""Distributed training on Dask: keep the best checkpoints of a run and persist them.

- :class:`CheckpointConfig`: how many checkpoints to keep, ranked by which metric,
  and where to persist them (Ray AIR's ``CheckpointConfig``).
- :class:`CheckpointManager`: registers reported checkpoints, keeps the top K, deletes
  the others wherever they live, persists in the background, and restores itself from
  storage after a restart.
"""

from __future__ import annotations

from dckpt.train._config import CheckpointConfig
from dckpt.train._manager import CheckpointManager, TrackedCheckpoint
from dckpt.train._scoring import MetricNotFoundError

__all__ = [
    "CheckpointConfig",
    "CheckpointManager",
    "MetricNotFoundError",
    "TrackedCheckpoint",
]
