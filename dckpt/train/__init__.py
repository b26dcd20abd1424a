"""Distributed training on Dask with Ray Train's API.

- :class:`DataParallelTrainer` (or :func:`fit`) runs a training function on N workers,
  spread across nodes, and restarts the group from the latest checkpoint when a worker
  or a node dies (up to ``max_failures``); it returns a :class:`Result`.
- Inside the training function: :func:`report` metrics and checkpoints,
  :func:`get_checkpoint` to resume from, :func:`get_context` for ranks and node,
  :func:`get_dataset_shard` for this rank's partitions of the trainer's ``datasets``
  (dask DataFrames or Bags; a :class:`DatasetShard`).
- :class:`CheckpointConfig`: how many checkpoints to keep, ranked by which metric,
  and where to persist them (Ray AIR's ``CheckpointConfig``); :class:`ScalingConfig`,
  :class:`RunConfig` and :class:`FailureConfig`, Ray AIR's other configs, which the
  trainer takes besides its flat keywords (:mod:`dckpt.air` has them all by Ray's
  names).
- :class:`CheckpointManager`: registers reported checkpoints, keeps the top K, deletes
  the others wherever they live, persists in the background, and restores itself from
  storage after a restart.

>>> from dckpt.train import DataParallelTrainer, report, get_checkpoint, get_context
>>> def train(config):  # doctest: +SKIP
...     start = 0 if get_checkpoint() is None else get_checkpoint().to_dict()["epoch"] + 1
...     for epoch in range(start, 10):
...         report({"epoch": epoch}, checkpoint=Checkpoint.from_dict({"epoch": epoch}))
>>> DataParallelTrainer(train, num_workers=2, max_failures=3).fit()  # doctest: +SKIP
"""

from __future__ import annotations

from dckpt.errors import (
    MetricNotFoundError,
    NoBestCheckpointError,
    TrainingFailedError,
    WorkerLostError,
)
from dckpt.train._datasets import DatasetShard
from dckpt.train._manager import CheckpointManager, TrackedCheckpoint
from dckpt.train._result import Result
from dckpt.train._run_config import (
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from dckpt.train._session import (
    TrainContext,
    get_checkpoint,
    get_context,
    get_dataset_shard,
    report,
    stop_requested,
)
from dckpt.train._trainer import DataParallelTrainer, fit

__all__ = [
    "CheckpointConfig",
    "CheckpointManager",
    "DataParallelTrainer",
    "DatasetShard",
    "FailureConfig",
    "MetricNotFoundError",
    "NoBestCheckpointError",
    "Result",
    "RunConfig",
    "ScalingConfig",
    "TrackedCheckpoint",
    "TrainContext",
    "TrainingFailedError",
    "WorkerLostError",
    "fit",
    "get_checkpoint",
    "get_context",
    "get_dataset_shard",
    "report",
    "stop_requested",
]
