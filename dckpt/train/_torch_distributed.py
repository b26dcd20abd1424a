"""Optional ``torch.distributed`` (gloo) set-up across the ranks of a run.

PyTorch stays optional: it is imported only here, only when asked for. The driver
picks the master address before the ranks start (:func:`master_address`, run on rank
0's worker), so every rank knows it from the start and none has to wait for rank 0.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import dask.config
import distributed
from dask.utils import parse_timedelta
from distributed.comm import get_address_host

from dckpt import _node
from dckpt.train._session import TrainContext

__all__ = ["destroy_process_group", "init_process_group", "master_address"]

# Told whenever a rank of this process leaves its process group (see init_process_group).
_group_left = threading.Condition()

_MISSING = (
    "DataParallelTrainer(setup_torch_distributed=True) needs PyTorch on every worker "
    "(pip install torch); it could not be imported on {where}: {error}"
)


def _import_torch_distributed(where: str) -> Any:
    try:
        import torch.distributed
    except ImportError as e:
        raise ImportError(_MISSING.format(where=where, error=e)) from e
    return torch.distributed


def _free_port() -> int:
    """A TCP port free on this host now. Runs on rank 0's worker."""
    _import_torch_distributed(f"rank 0's node {_node.node_id()}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def master_address(client: distributed.Client, worker: str) -> tuple[str, int]:
    """Rank 0's host and a port free there, for ``MASTER_ADDR``/``MASTER_PORT``.

    Raises
    ------
    ImportError
        If PyTorch cannot be imported on that worker.
    """
    port = client.run(_free_port, workers=[worker])[worker]
    return get_address_host(worker), int(port)


def init_process_group(context: TrainContext, master: tuple[str, int]) -> None:
    """Set the ``torch.distributed`` environment of this rank and join the gloo group.

    Runs in the rank's task thread. The environment variables are those
    ``torchrun`` sets, so ``init_method="env://"`` code works unchanged.
    """
    dist = _import_torch_distributed(f"node {context.node_id}")
    _wait_for_the_group_to_be_free(dist, context)
    os.environ.update(
        MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
        RANK=str(context.world_rank), WORLD_SIZE=str(context.world_size),
        LOCAL_RANK=str(context.local_rank), LOCAL_WORLD_SIZE=str(context.local_world_size),
    )
    dist.init_process_group(
        "gloo", init_method="env://", rank=context.world_rank, world_size=context.world_size
    )


def destroy_process_group() -> None:
    """Leave the group that :func:`init_process_group` joined, if it is still there."""
    dist = _import_torch_distributed("this worker")
    with _group_left:
        if dist.is_initialized():
            dist.destroy_process_group()
        _group_left.notify_all()


def _wait_for_the_group_to_be_free(dist: Any, context: TrainContext) -> None:
    """Wait until no earlier rank of this worker process holds the default group.

    ``torch.distributed`` has one default group per process. After a failure the new
    attempt's rank may land on a worker whose rank of the failed attempt has not left
    yet: it leaves once its collectives fail (a peer is gone) or at its next
    ``report()``, and then calls :func:`destroy_process_group`. Joining before that
    would raise "trying to initialize the default process group twice", failing the
    new attempt too. Bounded by ``dckpt.train.worker-wait-timeout``.
    """
    timeout = parse_timedelta(dask.config.get("dckpt.train.worker-wait-timeout"), default="s")
    with _group_left:
        if not _group_left.wait_for(lambda: not dist.is_initialized(), timeout=timeout):
            raise RuntimeError(
                f"rank {context.world_rank} of {context.run_name!r} (attempt "
                f"{context.attempt}) cannot join torch.distributed on node "
                f"{context.node_id}: a rank of an earlier attempt in this worker process "
                f"still holds its process group after {timeout:g} s "
                "(dckpt.train.worker-wait-timeout)"
            )
