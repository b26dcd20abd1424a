"""Ray AIR's ``ray.air.session`` (Ray 2.6) on dckpt's trainer.

Worker side: called inside a training function that
:class:`~dckpt.train.DataParallelTrainer` (or :class:`~dckpt.train.torch.TorchTrainer`)
runs; each function is a thin view of :func:`dckpt.train.report`,
:func:`dckpt.train.get_checkpoint` and :func:`dckpt.train.get_context`.

>>> from dckpt.air import session
>>> def train_loop_per_worker(config):  # doctest: +SKIP
...     session.report({"rank": session.get_world_rank()})

Where it differs from Ray on purpose: outside a training function every function
raises ``RuntimeError`` (Ray 2.6 warns and returns a default), so a misplaced call is
not mistaken for rank 0 of a run of one; and :func:`get_dataset_shard` gives a
shard of a dask collection (see there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dckpt._checkpoint import Checkpoint
from dckpt.train import get_checkpoint as _get_checkpoint
from dckpt.train import get_context
from dckpt.train import get_dataset_shard as _get_dataset_shard
from dckpt.train import report as _report

__all__ = [
    "get_checkpoint",
    "get_dataset_shard",
    "get_local_rank",
    "get_local_world_size",
    "get_node_rank",
    "get_trial_name",
    "get_world_rank",
    "get_world_size",
    "report",
]


def report(metrics: Mapping[str, Any], *, checkpoint: Checkpoint | None = None) -> None:
    """Report metrics, and optionally a checkpoint, to the trainer.

    Ray's ``session.report``; see :func:`dckpt.train.report`. Only rank 0's
    checkpoints are kept, as in Ray. Unlike Ray, a directory checkpoint is not moved:
    it is served from where it is, so leave the directory alone after reporting it.
    """
    _report(metrics, checkpoint=checkpoint)


def get_checkpoint() -> Checkpoint | None:
    """The checkpoint to resume from (the latest after a failure, else the trainer's
    ``resume_from_checkpoint``), or None on a fresh start."""
    return _get_checkpoint()


def get_world_rank() -> int:
    """This rank, 0 to ``get_world_size() - 1``."""
    return get_context().world_rank


def get_world_size() -> int:
    """How many ranks the run has."""
    return get_context().world_size


def get_local_rank() -> int:
    """This rank's index among the ranks on its node."""
    return get_context().local_rank


def get_local_world_size() -> int:
    """How many ranks run on this node."""
    return get_context().local_world_size


def get_node_rank() -> int:
    """This node's index among the nodes of the run."""
    return get_context().node_rank


def get_trial_name() -> str:
    """The run's name (``RunConfig(name=...)``, else the one the trainer made up).

    A run of dckpt is one trial, so this is the name Ray would call the experiment's.
    """
    return get_context().run_name


def get_dataset_shard(dataset_name: str | None = None) -> Any:
    """This rank's shard of the trainer's ``datasets[dataset_name]``
    (:func:`dckpt.train.get_dataset_shard`).

    The trainer's ``datasets`` are dask DataFrames or Bags, split by partition; the
    shard is a :class:`~dckpt.train.DatasetShard` (``to_pandas()``,
    ``iter_batches()``, ``partitions()``) where Ray gives a ``DataIterator``.
    """
    return _get_dataset_shard(dataset_name)
