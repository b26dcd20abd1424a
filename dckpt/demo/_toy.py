"""The demo's model: logistic regression in plain Python, trained data-parallel.

Small on purpose: dckpt's demo and examples must run with dckpt's own dependencies
(no numpy), and the interest is in the checkpoints, not the maths. Each rank computes
the gradient on its shard, the ranks average gradients through Dask variables
(:func:`all_reduce_mean`), take the same step, and rank 0 writes a directory
checkpoint on its node (weights, epoch, optimizer state).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import distributed

from dckpt import _node
from dckpt._checkpoint import Checkpoint
from dckpt.predict import Predictor
from dckpt.train import get_checkpoint, get_context, report, stop_requested

__all__ = [
    "N_FEATURES",
    "ToyPredictor",
    "accuracy",
    "all_reduce_mean",
    "make_data",
    "offer_node_for_kill",
    "rank_0_reported",
    "train_loop",
]

N_SAMPLES = 600
N_FEATURES = 3
STATE_FILE = "state.json"

Example = tuple[list[float], int]


def make_data(seed: int = 0, n: int = N_SAMPLES) -> list[Example]:
    """Points whose label follows a fixed linear rule, with some noise."""
    rng = random.Random(seed)
    true_weights = [1.5, -2.0, 0.5]
    data = []
    for _ in range(n):
        x = [rng.gauss(0, 1) for _ in range(N_FEATURES)]
        logit = sum(w * xi for w, xi in zip(true_weights, x)) + rng.gauss(0, 0.5)
        data.append((x, int(logit > 0)))
    return data


def _probability(weights: Sequence[float], x: Sequence[float]) -> float:
    z = sum(w * xi for w, xi in zip(weights, x)) + weights[-1]
    return 1 / (1 + math.exp(-z))


def loss_and_gradient(weights: list[float], data: list[Example]) -> list[float]:
    """[d loss / d w_0, ..., d loss / d w_n, loss], the log loss averaged over ``data``;
    the last weight is the bias."""
    gradient = [0.0] * len(weights)
    loss = 0.0
    for x, y in data:
        p = _probability(weights, x)
        loss -= math.log(p if y else 1 - p)
        for i, xi in enumerate([*x, 1.0]):
            gradient[i] += (p - y) * xi
    return [g / len(data) for g in gradient] + [loss / len(data)]


class AttemptStopped(RuntimeError):
    """A rank of :func:`train_loop` gave up waiting: the driver stopped its attempt."""


# How often a waiting rank asks whether its attempt was stopped: a wait, not a timeout.
_POLL_SECONDS = 0.5
# How long rank 1 waits to be killed once it offered its node (a driver that never
# kills it is a bug of the caller: the rank then fails rather than hang the run).
_KILL_WAIT_SECONDS = 300


def all_reduce_mean(values: list[float], tag: str) -> list[float]:
    """The mean over all ranks of ``values``, through one Dask Variable per rank.

    Every rank of the attempt must call it with the same ``tag``. It waits for its
    peers as long as the attempt lives: a peer slow to start on a busy machine is
    waited for; once the driver gives up on the attempt (a peer died,
    :func:`dckpt.train.stop_requested`) it raises :class:`AttemptStopped`.
    """
    context = get_context()
    client = distributed.get_client()
    prefix = f"{context.run_name}-attempt-{context.attempt}-{tag}"
    mine = distributed.Variable(f"{prefix}-rank-{context.world_rank}", client=client)
    mine.set(values)
    total = [0.0] * len(values)
    for rank in range(context.world_size):
        theirs = distributed.Variable(f"{prefix}-rank-{rank}", client=client)
        while True:
            try:
                value = theirs.get(timeout=_POLL_SECONDS)
                break
            except (TimeoutError, asyncio.TimeoutError):  # distinct types in Python 3.10
                if stop_requested():
                    raise AttemptStopped(f"attempt {context.attempt} was stopped while "
                                         f"rank {context.world_rank} waited for rank {rank}")
        total = [t + v for t, v in zip(total, value)]
    return [t / context.world_size for t in total]


def _save(state: dict[str, Any]) -> Checkpoint:
    """Write ``state`` to a fresh directory on this node and wrap it."""
    context = get_context()
    path = os.path.join(_node.node_root(), "demo-checkpoints", context.run_name,
                        f"epoch-{state['epoch']:03d}-attempt-{context.attempt}")
    os.makedirs(path)
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump(state, f)
    return Checkpoint.from_directory(path)


def read_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """The state a checkpoint of :func:`train_loop` holds (fetched here if need be)."""
    with checkpoint.as_directory() as path, open(os.path.join(path, STATE_FILE)) as f:
        state: dict[str, Any] = json.load(f)
    return state


def train_loop(config: Mapping[str, Any]) -> None:
    """One rank: gradient descent with momentum, gradients averaged over ranks.

    ``config``: ``epochs``, ``lr``, ``momentum``, ``epoch_seconds`` (a pause standing
    for real work), and optionally ``victim`` and ``kill_after``: rank 1 of the first
    attempt sets the Dask Variable ``victim`` to its node id after epoch ``kill_after``
    (:func:`offer_node_for_kill`; the driver then kills that node, as a crash would).
    """
    context = get_context()
    shard = make_data()[context.world_rank::context.world_size]
    weights = [0.0] * (N_FEATURES + 1)
    momentum = [0.0] * (N_FEATURES + 1)
    start, resumed_from = 0, None
    checkpoint = get_checkpoint()
    if checkpoint is not None:
        # Fetched from the node that wrote it the first time it is used here.
        state = read_state(checkpoint)
        weights, momentum = state["weights"], state["optimizer"]["momentum"]
        start = resumed_from = state["epoch"] + 1

    for epoch in range(start, config["epochs"]):
        time.sleep(config.get("epoch_seconds", 0.0))
        *gradient, loss = all_reduce_mean(loss_and_gradient(weights, shard), f"epoch-{epoch}")
        momentum = [config["momentum"] * m + g for m, g in zip(momentum, gradient)]
        weights = [w - config["lr"] * m for w, m in zip(weights, momentum)]
        saved = None
        if context.world_rank == 0:
            saved = _save({"epoch": epoch, "weights": weights,
                           "optimizer": {"momentum": momentum, "lr": config["lr"]}})
        report({"epoch": epoch, "loss": loss, "resumed_from": resumed_from,
                "node_id": context.node_id}, checkpoint=saved)
        offer_node_for_kill(config, epoch, resumed_from)


def offer_node_for_kill(config: Mapping[str, Any], epoch: int, resumed_from: int | None) -> None:
    """Rank 1 of a fresh start names its node after epoch ``config["kill_after"]``.

    It sets the Dask Variable ``config["victim"]`` to its node id, which
    :func:`~dckpt.demo.train_with_a_kill` waits for to kill that node, and waits for
    that: the node dies right after epoch ``kill_after``, however long the driver takes
    to kill it on a busy machine, so no later epoch is checkpointed before the kill.
    Rank 0 sets a Dask Event (named by :func:`rank_0_reported`) once its report of
    that epoch is queued (``report`` returns then), and the driver waits for it too: a
    kill while rank 0 is still saving would stop its attempt before that checkpoint
    counted, and the run would resume an epoch early. So it resumes at
    ``kill_after + 1``. Call it after ``report``; does nothing on other ranks, after a
    resume, or without ``victim`` in ``config``.
    """
    context = get_context()
    if (resumed_from is not None or epoch != config.get("kill_after")
            or not config.get("victim")):
        return
    if context.world_rank == 0:
        distributed.Event(rank_0_reported(config["victim"])).set()
    elif context.world_rank == 1:
        distributed.Variable(config["victim"]).set(context.node_id)
        deadline = time.monotonic() + _KILL_WAIT_SECONDS
        while not stop_requested():  # the kill ends this task; the stop, its attempt
            if time.monotonic() > deadline:
                raise RuntimeError(f"{context.node_id} offered itself for a kill after "
                                   f"epoch {epoch} and was not killed within "
                                   f"{_KILL_WAIT_SECONDS} s")
            distributed.Event(f"{config['victim']}-never-set").wait(_POLL_SECONDS)


def rank_0_reported(victim: str) -> str:
    """The name of the Event rank 0 sets once its report of the kill's epoch is queued."""
    return f"{victim}-rank-0-reported"


class ToyPredictor(Predictor):
    """Scores batches ``{"x": [[features], ...], ...}`` with a :func:`train_loop` checkpoint.

    Answers ``{"probability": [...], "label": [...]}`` plus the batch's ``"y"`` when it
    has one (so that accuracy can be computed from the predictions alone).
    """

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.weights = weights

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, **kwargs: Any) -> ToyPredictor:
        return cls(read_state(checkpoint)["weights"], **kwargs)

    def _predict(self, batch: Any, **kwargs: Any) -> Any:
        probabilities = [_probability(self.weights, x) for x in batch["x"]]
        out: dict[str, list[Any]] = {"probability": probabilities,
                                     "label": [int(p > 0.5) for p in probabilities]}
        if "y" in batch:
            out["y"] = list(batch["y"])
        return out


def accuracy(predictions: Sequence[Mapping[str, Sequence[int]]]) -> float:
    """The share of right labels over batches of :class:`ToyPredictor` answers."""
    right = total = 0
    for batch in predictions:
        right += sum(int(a == b) for a, b in zip(batch["label"], batch["y"]))
        total += len(batch["label"])
    return right / total if total else float("nan")
