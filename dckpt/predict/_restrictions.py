"""The scheduler side of batch prediction: scoring tasks run only beside a predictor.

Dask DataFrames (query planning) drop ``dask.annotate`` restrictions, and graph
optimization fuses and renames tasks. What survives every rewrite is a task's
dependencies, so the scoring tasks depend on the scorer actors of their prediction
(keys starting with :data:`SCORER_PREFIX`), and :class:`ScoringRestrictionsPlugin`
restricts each new task that depends on such actors to the workers those actors are
placed on, strictly (no other worker may run it). Fused downstream tasks inherit the
dependency, hence the restriction: the partition is computed and scored where a
predictor is loaded.

Runs on the scheduler's event loop; it only reads and sets task state.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, TaskState

__all__ = ["SCORER_PREFIX", "ScoringRestrictionsPlugin"]

logger = logging.getLogger(__name__)

#: The key prefix of every scorer actor.
SCORER_PREFIX = "dckpt-scorer-"


class ScoringRestrictionsPlugin(SchedulerPlugin):
    """Restricts tasks that depend on scorer actors to those actors' workers.

    Installed by :meth:`~dckpt.predict.BatchPredictor.predict` (idempotent), under the
    name ``"dckpt-scoring"``.
    """

    name = "dckpt-scoring"
    idempotent = True

    def update_graph(self, scheduler: Scheduler, *, tasks: list[Any], **kwargs: Any) -> None:
        # Runs before the new tasks are transitioned: the restriction holds from the start.
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is None or ts.actor:
                continue
            workers = _scorer_workers(ts)
            if workers:
                ts.worker_restrictions = workers
                ts.loose_restrictions = False


def _scorer_workers(ts: TaskState) -> set[str]:
    """Where the scorer actors ``ts`` depends on are placed, or are (if moved)."""
    workers: set[str] = set()
    for dep in ts.dependencies:
        if isinstance(dep.key, str) and dep.key.startswith(SCORER_PREFIX):
            workers |= set(dep.worker_restrictions or ())
            workers |= {ws.address for ws in dep.who_has or ()}
    return workers
