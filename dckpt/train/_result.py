"""``Result``: what a training run leaves behind (Ray AIR's ``ray.air.Result``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dckpt.checkpoint import Checkpoint

__all__ = ["Result"]


@dataclass
class Result:
    """The outcome of :meth:`DataParallelTrainer.fit`.

    Attributes
    ----------
    metrics : dict or None
        The last metrics reported by rank 0 (with the keys the trainer adds, see
        ``metrics_history``), or None if rank 0 never reported.
    checkpoint : Checkpoint or None
        The latest checkpoint registered with the run's manager (rank 0's last).
        A directory checkpoint written on a worker is a node reference: its data are
        fetched on first use.
    best_checkpoints : list of (Checkpoint, dict)
        The checkpoints the manager kept, with their metrics, as its
        ``best_checkpoints`` orders them.
    metrics_history : list of dict
        Every report of every rank and attempt, in the order the driver received
        them. Each is the reported metrics plus ``world_rank``, ``attempt``,
        ``training_iteration`` (that rank's count of reports over the whole run,
        from 1) and ``timestamp`` (seconds since the epoch, on the worker), unless
        the training function reported keys of those names itself.
    error : BaseException or None
        Why the run failed, when it did (then :class:`TrainingFailedError` carries
        this result); None after a successful run.
    run_name : str
        The run's name (:attr:`TrainContext.run_name`).
    failures : int
        How many times the ranks were restarted after a failure.
    """

    metrics: dict[str, Any] | None
    checkpoint: Checkpoint | None
    best_checkpoints: list[tuple[Checkpoint, dict[str, Any]]] = field(default_factory=list)
    metrics_history: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None
    run_name: str = ""
    failures: int = 0

    @property
    def metrics_dataframe(self) -> Any:
        """``metrics_history`` as a ``pandas.DataFrame``, one row per report.

        Raises
        ------
        ImportError
            If pandas is not installed; ``metrics_history`` holds the same data.
        """
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError(
                "Result.metrics_dataframe needs pandas (pip install pandas); "
                "Result.metrics_history holds the same rows as a list of dicts"
            ) from e
        return pd.DataFrame(self.metrics_history)

    def __repr__(self) -> str:
        state = f"error={self.error!r}" if self.error is not None else f"metrics={self.metrics!r}"
        return (f"Result({self.run_name!r}, {state}, checkpoint={self.checkpoint!r}, "
                f"reports={len(self.metrics_history)}, failures={self.failures})")
