"""PyTorch DistributedDataParallel that survives the loss of a node, on a local 3-node cluster.

Run it with ``python examples/train_torch_ddp.py`` where PyTorch is installed
(``pip install torch==2.13.0``, the CPU build is enough; about 25 s on 2 cores);
without it, the script says so and exits.

The story of ``examples/train_data_parallel.py``, told with PyTorch. Two ranks fit a
linear model to y = 3x - 1, each on its half of the data, wrapped in
``DistributedDataParallel`` (gloo, CPU): ``setup_torch_distributed=True`` sets
``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in every
rank and joins them into one process group before the function runs, as ``torchrun``
would. Every epoch rank 0 saves a ``torch.save`` checkpoint (model, optimizer, epoch)
in a directory on its own node; the driver only holds a reference to it.

After epoch 8 the driver kills the node of rank 1 (``dckpt.demo.train_with_a_kill``,
shared with the other example and ``dckpt demo``). Rank 0's gradient all-reduce
fails, the trainer restarts both ranks on the nodes still alive, and each loads the
latest checkpoint, fetched from rank 0's node to wherever it landed (the nodes share
no disk): the loss goes on from where it was.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from dckpt import Checkpoint, node_root
from dckpt.cluster import NodeCluster
from dckpt.demo import (
    KILL_AFTER_EPOCH,
    offer_node_for_kill,
    print_loss_curve,
    train_with_a_kill,
)
from dckpt.train import Result, get_checkpoint, get_context, report

EPOCHS = 16
EPOCH_SECONDS = 0.1  # stands in for real work, so the kill lands mid-training


def train_loop(config: dict[str, Any]) -> None:
    """One rank: DDP on this rank's share of y = 3x - 1; rank 0 checkpoints each epoch."""
    # Imported here: only the workers need PyTorch (and the driver starts faster).
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # two ranks share two cores
    context = get_context()
    torch.manual_seed(0)  # the same initial weights and data on every rank
    x = torch.randn(256, 1)
    y = 3 * x - 1 + 0.1 * torch.randn(256, 1)
    x, y = x[context.world_rank::context.world_size], y[context.world_rank::context.world_size]

    model = DistributedDataParallel(nn.Linear(1, 1))  # gradients are averaged over ranks
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    start, resumed_from = 0, None
    checkpoint = get_checkpoint()
    if checkpoint is not None:  # fetched from the node that wrote it, on first use here
        with checkpoint.as_directory() as path:
            state = torch.load(os.path.join(path, "model.pt"))
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = resumed_from = state["epoch"] + 1

    for epoch in range(start, config["epochs"]):
        time.sleep(config["epoch_seconds"])
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        saved = None
        if context.world_rank == 0:
            path = os.path.join(node_root(), "torch-example", context.run_name,
                                f"epoch-{epoch:03d}-attempt-{context.attempt}")
            os.makedirs(path)
            torch.save({"model": model.module.state_dict(),
                        "optimizer": optimizer.state_dict(), "epoch": epoch},
                       os.path.join(path, "model.pt"))
            saved = Checkpoint.from_directory(path)
        report({"epoch": epoch, "loss": loss.item(), "resumed_from": resumed_from,
                "node_id": context.node_id}, checkpoint=saved)
        offer_node_for_kill(config, epoch, resumed_from)  # rank 1, after epoch 8


def main() -> None:
    if importlib.util.find_spec("torch") is None:
        sys.exit("This example needs PyTorch: pip install torch==2.13.0 (the CPU build).")
    storage = tempfile.mkdtemp(prefix="dckpt-torch-example-storage-")
    try:
        # Two threads per worker: a rank of the failed attempt that is still on its way
        # out does not hold up the rank of the new attempt on that worker.
        with NodeCluster(3, isolate=True, threads_per_worker=2) as cluster, \
                cluster.client() as client:
            result, _ = train_with_a_kill(
                cluster, client, f"file://{storage}", epochs=EPOCHS,
                epoch_seconds=EPOCH_SECONDS, num_to_keep=2,
                train_loop_per_worker=train_loop, train_loop_config={"lr": 0.1},
                setup_torch_distributed=True,
                on_kill=lambda node_id: print(
                    f"-- killing {node_id} (rank 1) after epoch {KILL_AFTER_EPOCH} --",
                    flush=True),
            )
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    show(result)


def show(result: Result) -> None:
    """Print rank 0's loss curve, attempt by attempt, then the outcome."""
    print_loss_curve(result)
    print(f"failures survived: {result.failures}; final loss {result.metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
