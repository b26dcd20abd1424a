"""Worker preload: a NodeStore on this worker when the scheduler cannot be touched.

    dask worker SCHEDULER --preload scheduler/dckpt_worker_preload.py

or ``DASK_DISTRIBUTED__WORKER__PRELOAD=/abs/path/dckpt_worker_preload.py``. The worker
gets its store, so checkpoints move between nodes; the scheduler keeps no registry
(``dckpt.cluster.who_has`` needs the scheduler preload or ``dckpt.cluster.install``,
which may still be called later from a client).
"""

from distributed import Worker

from dckpt.cluster import NodeStorePlugin


async def dask_setup(worker: Worker) -> None:
    await worker.plugin_add(NodeStorePlugin())
