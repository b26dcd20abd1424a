"""PyTorch DistributedDataParallel on Dask workers: gloo, CPU, a tiny model.

Run it with ``python examples/train_torch_ddp.py`` where PyTorch is installed
(``pip install torch``); without it, the script says so and exits.

``setup_torch_distributed=True`` makes the trainer set ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in every rank and join
them into one gloo process group before the training function runs, as ``torchrun``
would. Rank 0 saves ``torch.save`` checkpoints on its own node each epoch; a rank
that resumes loads the latest one wherever it runs.
"""

from __future__ import annotations

import os
import sys
import tempfile

from dckpt import Checkpoint, node
from dckpt.cluster import NodeCluster
from dckpt.train import (
    CheckpointConfig,
    DataParallelTrainer,
    get_checkpoint,
    get_context,
    report,
)

try:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
except ImportError:
    torch = None


def train_loop(config: dict) -> None:
    """One rank: a linear model fitted to y = 3x - 1 on this rank's share of the data."""
    context = get_context()
    torch.manual_seed(0)  # the same initial weights and data on every rank
    x = torch.randn(512, 1)
    y = 3 * x - 1 + 0.1 * torch.randn(512, 1)
    x, y = x[context.world_rank::context.world_size], y[context.world_rank::context.world_size]

    model = DistributedDataParallel(nn.Linear(1, 1))  # gradients are averaged over ranks
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    start = 0
    checkpoint = get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state = torch.load(os.path.join(path, "model.pt"))
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1

    for epoch in range(start, config["epochs"]):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        checkpoint = None
        if dist.get_rank() == 0:
            path = os.path.join(node.node_root(), "torch-example", context.run_name,
                                f"epoch-{epoch:03d}-attempt-{context.attempt}")
            os.makedirs(path)
            torch.save({"model": model.module.state_dict(),
                        "optimizer": optimizer.state_dict(), "epoch": epoch},
                       os.path.join(path, "model.pt"))
            checkpoint = Checkpoint.from_directory(path)
        report({"epoch": epoch, "loss": loss.item()}, checkpoint=checkpoint)


def main() -> None:
    if torch is None:
        sys.exit("This example needs PyTorch: pip install torch (the CPU build is enough).")
    with tempfile.TemporaryDirectory(prefix="dckpt-torch-example-") as storage, \
            NodeCluster(2) as cluster, cluster.client() as client:
        result = DataParallelTrainer(
            train_loop, train_loop_config={"epochs": 20, "lr": 0.1}, num_workers=2,
            setup_torch_distributed=True, max_failures=1, client=client,
            checkpoint_config=CheckpointConfig(num_to_keep=2, storage_uri=f"file://{storage}"),
        ).fit()
    for m in result.metrics_history:
        if m["world_rank"] == 0:
            print(f"epoch {m['epoch']:2d}  loss {m['loss']:.4f}")
    print(f"final loss {result.metrics['loss']:.4f}; latest checkpoint {result.checkpoint!r}")


if __name__ == "__main__":
    main()
