"""Data-parallel training that survives the loss of a node, on a local 3-node cluster.

Run it with ``python examples/train_data_parallel.py`` (about 15 s on 2 cores).

A logistic regression (pure Python: dckpt needs no numpy; the training function is
``dckpt.demo.train_loop`` and the run ``dckpt.demo.train_with_a_kill``, shared with
``dckpt demo``) is trained by two ranks, each on
its half of a synthetic data set. Every epoch each rank computes the gradient on its
half, the ranks average their gradients (a small all-reduce through Dask variables)
and take the same step, and rank 0 saves a checkpoint: a directory on its own node
with the weights, the epoch and the optimizer's momentum. Its bytes stay on that node;
the driver only holds a reference.

After a few epochs the driver kills the node of rank 1. The trainer notices, restarts
both ranks on the nodes still alive, and each resumes from rank 0's latest checkpoint,
fetched from rank 0's node to wherever the rank landed (the nodes share no disk). The
loss curve goes on from where it was instead of starting over.
"""

from __future__ import annotations

import shutil
import tempfile

from dckpt.cluster import NodeCluster
from dckpt.demo import KILL_AFTER_EPOCH, print_loss_curve, train_with_a_kill
from dckpt.train import Result

EPOCHS = 30
EPOCH_SECONDS = 0.15  # stands in for real work, so the kill lands mid-training


def main() -> None:
    storage = tempfile.mkdtemp(prefix="dckpt-example-storage-")
    try:
        result = run(storage)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    show(result)


def run(storage: str) -> Result:
    """Train on a fresh isolated 3-node cluster, killing rank 1's node on the way."""
    with NodeCluster(3, isolate=True, threads_per_worker=2) as cluster, \
            cluster.client() as client:
        # Two threads per worker: a rank of the failed attempt that still waits for
        # its dead peer does not hold up the rank of the new attempt on that worker.
        # train_with_a_kill runs DataParallelTrainer(train_loop, ...) with a
        # CheckpointConfig keeping the best 3 by loss at the storage URI.
        result, _ = train_with_a_kill(
            cluster, client, f"file://{storage}", epochs=EPOCHS,
            epoch_seconds=EPOCH_SECONDS, num_to_keep=3,
            on_kill=lambda node_id: print(
                f"-- killing {node_id} (rank 1) after epoch {KILL_AFTER_EPOCH} --", flush=True),
        )
    return result


def show(result: Result) -> None:
    """Print rank 0's loss curve, attempt by attempt, then the outcome."""
    print_loss_curve(result)
    print(f"failures survived: {result.failures}; final loss {result.metrics['loss']:.4f}; "
          f"best checkpoints kept: {len(result.best_checkpoints)}")


if __name__ == "__main__":
    main()
