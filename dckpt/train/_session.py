"""The session API: what a training function run by the trainer calls.

Worker side. The trainer's rank task (:mod:`dckpt.train._rank`) opens a session
around the user's function; :func:`report`, :func:`get_checkpoint` and
:func:`get_context` find it through a context variable of the task's thread. Outside
that, they raise ``RuntimeError``.

Only rank 0's checkpoints are kept, as in Ray: the ranks of a data-parallel run hold
the same model, so the others' checkpoints would be copies. A checkpoint reported by
another rank is dropped on its worker, with a debug log, before it is pickled (so its
node's store never registers it); that rank's metrics still reach the driver's history.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from dckpt._checkpoint import Checkpoint

logger = logging.getLogger(__name__)

__all__ = ["Report", "TrainContext", "get_checkpoint", "get_context", "get_dataset_shard",
           "report", "stop_requested"]


@dataclass(frozen=True)
class TrainContext:
    """Who this rank is; from :func:`get_context`.

    Attributes
    ----------
    world_rank
        This rank, 0 to ``world_size - 1``.
    world_size
        How many ranks the run has.
    local_rank
        This rank's index among the ranks on the same node.
    local_world_size
        How many ranks run on this node.
    node_rank
        This node's index among the nodes of the run.
    node_id
        This node's id (:func:`dckpt._node.node_id`).
    run_name
        The run's name (Ray's trial name); the same in every rank and attempt.
    attempt
        0 for the first start of the ranks, then one more for each restart after a
        failure.
    """

    world_rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    node_id: str
    run_name: str
    attempt: int


@dataclass(frozen=True)
class Report:
    """One call of :func:`report`, as it travels to the driver.

    ``checkpoint`` is pickled on the worker, where a directory checkpoint becomes a
    node reference: the report stays small whatever the checkpoint's size.
    """

    attempt: int
    world_rank: int
    metrics: dict[str, Any]
    checkpoint: Checkpoint | None
    timestamp: float


class ReportSender(Protocol):
    """How a session reaches the driver (:class:`dckpt.train._channel.WorkerChannel`)."""

    def send(self, report: Report) -> None: ...

    def stop_requested(self) -> bool: ...


class RankStopped(BaseException):
    """The driver stopped this rank's attempt (another rank failed).

    A ``BaseException``, so that a training function's ``except Exception`` does not
    swallow it; the rank task catches it and returns.
    """


@dataclass
class _Session:
    context: TrainContext
    checkpoint: Checkpoint | None
    sender: ReportSender
    datasets: Mapping[str, Any] | None = None


_current: ContextVar[_Session | None] = ContextVar("dckpt_train_session", default=None)


@contextlib.contextmanager
def session(
    context: TrainContext, checkpoint: Checkpoint | None, sender: ReportSender,
    datasets: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """Within the block, this thread is rank ``context.world_rank`` of a run."""
    token = _current.set(_Session(context, checkpoint, sender, datasets))
    try:
        yield
    finally:
        _current.reset(token)


def _require(name: str) -> _Session:
    current = _current.get()
    if current is None:
        raise RuntimeError(
            f"dckpt.train.{name}() works only inside a training function run by "
            "dckpt.train.DataParallelTrainer (or dckpt.train.fit), in the thread that "
            "runs it"
        )
    return current


def report(metrics: Mapping[str, Any], checkpoint: Checkpoint | None = None) -> None:
    """Send metrics, and optionally a checkpoint, to the driver.

    Parameters
    ----------
    metrics
        A small mapping of picklable values (it travels through the scheduler), e.g.
        ``{"loss": 0.1, "epoch": 3}``. Every rank's metrics go into the run's history.
    checkpoint
        Rank 0's checkpoint is registered with the run's checkpoint manager, and is
        what ranks resume from after a failure; other ranks' checkpoints are dropped
        (see the module notes). Write each checkpoint to a fresh directory (under
        :func:`dckpt._node.node_root`, say) and leave it alone afterwards: the node's
        store serves it from there, its bytes are not copied by this call.

    Raises
    ------
    RuntimeError
        Outside a training function run by the trainer.

    Notes
    -----
    Blocks until the report is queued on the scheduler (a round trip), so that the
    reports of a rank arrive in order and none is lost if the rank dies right after.
    """
    current = _require("report")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"report() takes a mapping of metrics, got {type(metrics).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"report() takes a dckpt.Checkpoint, got {type(checkpoint).__name__}")
    if current.sender.stop_requested():
        raise RankStopped(f"the driver stopped attempt {current.context.attempt}")
    context = current.context
    if checkpoint is not None and context.world_rank != 0:
        logger.debug("Dropping the checkpoint reported by rank %d: only rank 0's are kept",
                     context.world_rank)
        checkpoint = None
    current.sender.send(Report(
        attempt=context.attempt, world_rank=context.world_rank, metrics=dict(metrics),
        checkpoint=checkpoint, timestamp=time.time(),
    ))


def get_checkpoint() -> Checkpoint | None:
    """The checkpoint to resume from, or None on a fresh start.

    After a failure, the run's latest checkpoint (the manager's
    ``latest_checkpoint``); on the first start, the trainer's
    ``resume_from_checkpoint``. Its data are fetched to this node on first use.

    Raises
    ------
    RuntimeError
        Outside a training function run by the trainer.
    """
    return _require("get_checkpoint").checkpoint


def get_dataset_shard(dataset_name: str | None = None) -> Any:
    """This rank's shard of the trainer's ``datasets[dataset_name]``.

    A :class:`~dckpt.train.DatasetShard`: this rank's contiguous run of the dask
    collection's partitions (see :mod:`dckpt.train._datasets`), read with
    ``to_pandas()``, ``iter_batches()`` or ``partitions()``.

    Parameters
    ----------
    dataset_name
        A key of the trainer's ``datasets``; may be left out when there is one.

    Returns
    -------
    DatasetShard or None
        None, with a warning, when the trainer was given no datasets (as in Ray).

    Raises
    ------
    RuntimeError
        Outside a training function run by the trainer, or ``dataset_name`` left out
        with several datasets (as in Ray).
    KeyError
        No dataset of that name (Ray returns None).
    """
    datasets = _require("get_dataset_shard").datasets
    if not datasets:
        warnings.warn("get_dataset_shard(): the trainer was given no datasets; returning "
                      "None. Pass datasets={'train': dask_collection} to the trainer",
                      UserWarning, stacklevel=2)
        return None
    if dataset_name is None:
        if len(datasets) > 1:
            raise RuntimeError(f"the trainer has several datasets ({sorted(datasets)}): "
                               "name the one to get, get_dataset_shard('train')")
        return next(iter(datasets.values()))
    if dataset_name not in datasets:
        raise KeyError(f"no dataset {dataset_name!r}; the trainer has {sorted(datasets)}")
    return datasets[dataset_name]


def stop_requested() -> bool:
    """Whether the driver has given up on this rank's attempt (another rank failed).

    Not in Ray (whose collectives are torch's): for a training function that waits on
    its peers with Dask's own primitives (a ``distributed.Variable`` or ``Event`` per
    step), which should poll this while it waits and return once it is true, instead of
    a timeout that a slow peer on a busy machine would also run into. :func:`report`
    raises when it is true, so a function that reports needs it only while it waits.

    Raises
    ------
    RuntimeError
        Outside a training function run by the trainer.
    """
    return _require("stop_requested").sender.stop_requested()


def get_context() -> TrainContext:
    """This rank's :class:`TrainContext` (ranks, node, run name, attempt).

    Raises
    ------
    RuntimeError
        Outside a training function run by the trainer.
    """
    return _require("get_context").context
