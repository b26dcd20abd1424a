"""Distributed training on Dask with Ray Train's API: a session for the training
function, a fault-tolerant data-parallel runner, and its result.

>>> from dckpt.train import DataParallelTrainer, report, get_checkpoint, get_context
>>> def train(config):  # doctest: +SKIP
...     start = 0 if get_checkpoint() is None else get_checkpoint().to_dict()["epoch"] + 1
...     for epoch in range(start, 10):
...         report({"epoch": epoch}, checkpoint=Checkpoint.from_dict({"epoch": epoch}))
>>> DataParallelTrainer(train, num_workers=2, max_failures=3).fit()  # doctest: +SKIP
"""

from __future__ import annotations

from dckpt.train._errors import TrainingFailedError, WorkerLostError
from dckpt.train._result import Result
from dckpt.train._session import TrainContext, get_checkpoint, get_context, report
from dckpt.train._trainer import DataParallelTrainer, fit

# --- checkpoint manager (added at merge) --------------------------------------------
# from dckpt.train._config import CheckpointConfig
# from dckpt.train._manager import CheckpointManager, TrackedCheckpoint
# ... and "CheckpointConfig", "CheckpointManager", "TrackedCheckpoint" in __all__.
# -------------------------------------------------------------------------------------

__all__ = [
    "DataParallelTrainer",
    "Result",
    "TrainContext",
    "TrainingFailedError",
    "WorkerLostError",
    "fit",
    "get_checkpoint",
    "get_context",
    "report",
]
