"""``Result``: what a training run leaves behind (Ray AIR's ``ray.air.Result``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dckpt._checkpoint import Checkpoint
from dckpt.errors import MetricNotFoundError, NoBestCheckpointError
from dckpt.train._ranking import score_of

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
        fetched on first use (or from its persisted copy once its node is gone).
        After a run on the trainer's own local cluster (``fit()`` without a client)
        it is a directory on this machine instead.
    best_checkpoints : list of (Checkpoint, dict)
        The best checkpoints the manager kept, with their metrics, in Ray 2.6's order:
        **worst first**, the best last (see
        :attr:`CheckpointManager.best_checkpoints`). Pick one by a metric with
        :meth:`get_best_checkpoint`.
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

    def get_best_checkpoint(self, metric: str, mode: str) -> Checkpoint:
        """The checkpoint of :attr:`best_checkpoints` with the best value of ``metric``.

        Ray AIR's ``Result.get_best_checkpoint`` (Ray 2.6).

        Parameters
        ----------
        metric
            A key of the checkpoints' metrics; a dotted name reaches into nested
            dicts (``"val.loss"``), as ``checkpoint_score_attribute`` does.
        mode
            ``"max"``: the highest value is the best; ``"min"``: the lowest.

        Returns
        -------
        Checkpoint

        Raises
        ------
        NoBestCheckpointError
            No checkpoint was kept, or none of them reported ``metric`` (a
            ``RuntimeError``, as in Ray; checked before ``mode``, as in Ray).
        ValueError
            ``mode`` is neither ``"max"`` nor ``"min"``.
        TypeError
            A checkpoint reported ``metric`` with a value that is not a number.

        Notes
        -----
        As in Ray, checkpoints whose metrics lack ``metric`` are left out without a
        word, and of equal values the one listed first in :attr:`best_checkpoints`
        wins. Unlike Ray, whose ``max``/``min`` returns a NaN that happens to come
        first (and NaN scores do come first), a NaN value never beats a number.
        """
        if not self.best_checkpoints:
            raise NoBestCheckpointError(
                f"training run {self.run_name!r} kept no checkpoint, so there is no best "
                "one: report checkpoints with dckpt.train.report(..., checkpoint=...)"
            )
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
        candidates: list[tuple[tuple[bool, float, int], Checkpoint]] = []
        for position, (checkpoint, metrics) in enumerate(self.best_checkpoints):
            try:
                value = score_of(metrics, metric, what="metric")
            except MetricNotFoundError:
                continue
            # Greater is better; NaN below every number; the earlier of equals first.
            key = ((False, 0.0, -position) if math.isnan(value)
                   else (True, value if mode == "max" else -value, -position))
            candidates.append((key, checkpoint))
        if not candidates:
            keys = sorted({str(k) for _, metrics in self.best_checkpoints for k in metrics})
            raise NoBestCheckpointError(
                f"none of the {len(self.best_checkpoints)} checkpoints kept by training "
                f"run {self.run_name!r} reported the metric {metric!r}; their metrics "
                f"are: {keys}"
            )
        return max(candidates, key=lambda candidate: candidate[0])[1]

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
