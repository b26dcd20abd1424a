"""Optional ``torch.distributed`` (gloo) set-up across the ranks of a run.

PyTorch stays optional: it is imported only here, only when asked for. The driver
picks the master address before the ranks start (:func:`master_address`, run on rank
0's worker), so every rank knows it from the start and none has to wait for rank 0.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import distributed
from distributed.comm import get_address_host

from dckpt import node
from dckpt.train._session import TrainContext

__all__ = ["destroy_process_group", "init_process_group", "master_address"]

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
    _import_torch_distributed(f"rank 0's node {node.node_id()}")
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
    if dist.is_initialized():
        dist.destroy_process_group()
