"""Data-parallel training that survives the loss of a node, on a local 3-node cluster.

Run it with ``python examples/train_data_parallel.py`` (about 20 s on 2 cores).

A logistic regression (pure Python: dckpt needs no numpy) is trained by two ranks,
each on its half of a synthetic data set. Every epoch each rank computes the gradient
on its half, the ranks average their gradients (a small all-reduce through Dask
variables) and take the same step, and rank 0 saves a checkpoint: a directory on its
own node with the weights, the epoch and the optimizer's momentum. Its bytes stay on
that node; the driver only holds a reference.

After a few epochs the driver kills the node of rank 1. The trainer notices, restarts
both ranks on the nodes still alive, and each resumes from rank 0's latest checkpoint,
fetched from rank 0's node to wherever the rank landed (the nodes share no disk). The
loss curve goes on from where it was instead of starting over.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import threading
import time

import distributed

from dckpt import Checkpoint, node
from dckpt.cluster import NodeCluster
from dckpt.train import (
    CheckpointConfig,
    DataParallelTrainer,
    Result,
    get_checkpoint,
    get_context,
    report,
)

EPOCHS = 30
KILL_AFTER_EPOCH = 8  # rank 1 asks to be killed once it has reported this epoch
N_SAMPLES = 600
N_FEATURES = 3
EPOCH_SECONDS = 0.15  # stands in for real work, so the kill lands mid-training


def make_data(seed: int = 0) -> list[tuple[list[float], int]]:
    """Points whose label follows a fixed linear rule, with some noise."""
    rng = random.Random(seed)
    true_weights = [1.5, -2.0, 0.5]
    data = []
    for _ in range(N_SAMPLES):
        x = [rng.gauss(0, 1) for _ in range(N_FEATURES)]
        logit = sum(w * xi for w, xi in zip(true_weights, x)) + rng.gauss(0, 0.5)
        data.append((x, int(logit > 0)))
    return data


def loss_and_gradient(weights: list[float], data: list[tuple[list[float], int]]) -> list[float]:
    """[d loss / d w_0, ..., d loss / d w_n, loss], the log loss averaged over ``data``;
    the last weight is the bias."""
    gradient = [0.0] * len(weights)
    loss = 0.0
    for x, y in data:
        z = sum(w * xi for w, xi in zip(weights, x)) + weights[-1]
        p = 1 / (1 + math.exp(-z))
        loss -= math.log(p if y else 1 - p)
        for i, xi in enumerate([*x, 1.0]):
            gradient[i] += (p - y) * xi
    return [g / len(data) for g in gradient] + [loss / len(data)]


def all_reduce_mean(values: list[float], tag: str) -> list[float]:
    """The mean over all ranks of ``values``, through one Dask Variable per rank.

    Every rank of the attempt must call it with the same ``tag``. A rank whose peer
    died gives up after 10 s; by then the trainer has restarted the group anyway.
    """
    context = get_context()
    client = distributed.get_client()
    prefix = f"{context.run_name}-attempt-{context.attempt}-{tag}"
    mine = distributed.Variable(f"{prefix}-rank-{context.world_rank}", client=client)
    mine.set(values)
    total = [0.0] * len(values)
    for rank in range(context.world_size):
        theirs = distributed.Variable(f"{prefix}-rank-{rank}", client=client).get(timeout=10)
        total = [t + v for t, v in zip(total, theirs)]
    return [t / context.world_size for t in total]


def save_checkpoint(state: dict) -> Checkpoint:
    """Write ``state`` to a fresh directory on this node and wrap it."""
    context = get_context()
    path = os.path.join(node.node_root(), "example-checkpoints", context.run_name,
                        f"epoch-{state['epoch']:03d}-attempt-{context.attempt}")
    os.makedirs(path)
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(state, f)
    return Checkpoint.from_directory(path)


def train_loop(config: dict) -> None:
    """One rank: plain gradient descent with momentum, gradients averaged over ranks."""
    context = get_context()
    shard = make_data()[context.world_rank::context.world_size]
    weights = [0.0] * (N_FEATURES + 1)
    momentum = [0.0] * (N_FEATURES + 1)
    start, resumed_from = 0, None
    checkpoint = get_checkpoint()
    if checkpoint is not None:
        # Fetched from the node that wrote it the first time it is used here.
        with checkpoint.as_directory() as path, open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        weights, momentum = state["weights"], state["optimizer"]["momentum"]
        start = resumed_from = state["epoch"] + 1

    for epoch in range(start, config["epochs"]):
        time.sleep(EPOCH_SECONDS)
        *gradient, loss = all_reduce_mean(loss_and_gradient(weights, shard), f"epoch-{epoch}")
        momentum = [config["momentum"] * m + g for m, g in zip(momentum, gradient)]
        weights = [w - config["lr"] * m for w, m in zip(weights, momentum)]
        checkpoint = None
        if context.world_rank == 0:
            checkpoint = save_checkpoint({
                "epoch": epoch, "weights": weights,
                "optimizer": {"momentum": momentum, "lr": config["lr"]},
            })
        report({"epoch": epoch, "loss": loss, "resumed_from": resumed_from,
                "node_id": context.node_id}, checkpoint=checkpoint)
        if context.world_rank == 1 and resumed_from is None and epoch == KILL_AFTER_EPOCH:
            distributed.Variable(config["victim"]).set(context.node_id)


def kill_when_asked(cluster: NodeCluster, client: distributed.Client, victim: str) -> None:
    """Driver thread: kill the node that rank 1 names, as a crash would."""
    node_id = distributed.Variable(victim, client=client).get(timeout=120)
    index = next(i for i, info in enumerate(cluster.nodes) if info.node_id == node_id)
    print(f"-- killing {node_id} (rank 1) after epoch {KILL_AFTER_EPOCH} --", flush=True)
    cluster.kill_node(index)


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
        victim = f"dckpt-example-victim-{os.getpid()}"
        killer = threading.Thread(target=kill_when_asked, args=(cluster, client, victim))
        killer.start()
        trainer = DataParallelTrainer(
            train_loop,
            train_loop_config={"epochs": EPOCHS, "lr": 0.5, "momentum": 0.5, "victim": victim},
            num_workers=2, max_failures=2, client=client,
            checkpoint_config=CheckpointConfig(
                num_to_keep=3, checkpoint_score_attribute="loss",
                checkpoint_score_order="min", storage_uri=f"file://{storage}",
            ),
        )
        result = trainer.fit()
        killer.join()
        distributed.Variable(victim, client=client).delete()
    return result


def show(result: Result) -> None:
    """Print rank 0's loss curve, attempt by attempt."""
    rank0 = [m for m in result.metrics_history if m["world_rank"] == 0]
    for attempt in sorted({m["attempt"] for m in rank0}):
        rows = [m for m in rank0 if m["attempt"] == attempt]
        nodes = sorted({m["node_id"] for m in result.metrics_history if m["attempt"] == attempt})
        start = rows[0]["resumed_from"]
        print(f"attempt {attempt} on {', '.join(nodes)}: "
              + ("fresh start" if start is None else f"resumed from the checkpoint of "
                 f"epoch {start - 1}, continuing at epoch {start}"))
        for m in rows:
            print(f"  epoch {m['epoch']:2d}  loss {m['loss']:.4f}")
    first_loss = rank0[0]["loss"]
    resumed = [m for m in rank0 if m["attempt"] > 0]
    if resumed:
        before = [m for m in rank0 if m["attempt"] == 0 and m["epoch"] < resumed[0]["epoch"]]
        print(f"loss at the start {first_loss:.4f}; last before the failure "
              f"{before[-1]['loss']:.4f}; first after the resume {resumed[0]['loss']:.4f}: "
              "the curve continues, it did not restart")
    print(f"failures survived: {result.failures}; final loss {result.metrics['loss']:.4f}; "
          f"best checkpoints kept: {len(result.best_checkpoints)}")


if __name__ == "__main__":
    main()
