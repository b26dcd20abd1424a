"""The task that runs one rank of a training run on a worker.

Worker side: :func:`run_rank` runs in a worker's task thread, with the user's function
inside a session (:mod:`dckpt.train._session`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dckpt import _node
from dckpt._checkpoint import Checkpoint
from dckpt.train import _torch_distributed
from dckpt.train._channel import WorkerChannel
from dckpt.train._datasets import ShardArgument, shards_of
from dckpt.train._placement import Placement
from dckpt.train._session import RankStopped, TrainContext, session

logger = logging.getLogger(__name__)

__all__ = ["RankSpec", "run_rank"]


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs, built by the driver, pickled into the task."""

    train_loop: Callable[..., Any]
    config: dict[str, Any] | None
    placement: Placement
    world_size: int
    run_name: str
    attempt: int
    checkpoint: Checkpoint | None
    channel: WorkerChannel
    torch_master: tuple[str, int] | None


def run_rank(spec: RankSpec, datasets: ShardArgument | None = None) -> str:
    """Run ``spec.train_loop(spec.config)`` as one rank; returns how it ended.

    ``datasets`` is this rank's share of the trainer's datasets, the partitions
    already here (Dask resolved the futures of the task's argument).

    ``"finished"`` when the function returned, ``"stopped"`` when the driver stopped
    the attempt at a report. The function's own exceptions propagate: they fail the
    task, and the driver sees the failure.
    """
    placement = spec.placement
    context = TrainContext(
        world_rank=placement.world_rank, world_size=spec.world_size,
        local_rank=placement.local_rank, local_world_size=placement.local_world_size,
        node_rank=placement.node_rank, node_id=_node.node_id(), run_name=spec.run_name,
        attempt=spec.attempt,
    )
    # Ray calls the function without arguments when it takes none; so do we.
    args = () if _takes_no_arguments(spec.train_loop) else (dict(spec.config or {}),)
    with session(context, spec.checkpoint, spec.channel, shards_of(datasets)):
        if spec.torch_master is not None:
            _torch_distributed.init_process_group(context, spec.torch_master)
        try:
            spec.train_loop(*args)
        except RankStopped:
            logger.info("Rank %d of %s (attempt %d) stopped by the driver",
                        context.world_rank, context.run_name, context.attempt)
            return "stopped"
        finally:
            if spec.torch_master is not None:
                _torch_distributed.destroy_process_group()
    return "finished"


def _takes_no_arguments(func: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass the config
        return False
    return not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                   for p in parameters)
