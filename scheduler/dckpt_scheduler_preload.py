"""Scheduler preload: sets up dckpt on a whole cluster.

    dask scheduler --preload scheduler/dckpt_scheduler_preload.py

or ``DASK_DISTRIBUTED__SCHEDULER__PRELOAD=/abs/path/dckpt_scheduler_preload.py``.
Adds the checkpoint registry to the scheduler, which gives every worker that joins a
NodeStore: nothing to do on the workers or in client code (same as
``dckpt.cluster.install(client)``). Scheduler and workers must be able to import dckpt.
"""

from distributed import Scheduler

from dckpt.cluster import DckptSchedulerPlugin


def dask_setup(scheduler: Scheduler) -> None:
    scheduler.add_plugin(DckptSchedulerPlugin(), idempotent=True)
