"""The end-to-end story that ``dckpt demo`` tells, on a local isolated cluster.

1. Start a :class:`~dckpt.cluster.NodeCluster` of three nodes, each in its own mount
   namespace (no shared disk) where the kernel allows, with a node store on every
   worker.
2. Train the toy model (:func:`dckpt.demo.train_loop`) on two ranks, keeping the best
   two checkpoints by loss, persisted in the background to a local folder.
3. Kill the node of rank 1 mid-training: the trainer restarts both ranks on the nodes
   alive, and they resume from the latest checkpoint, fetched from rank 0's node.
4. Score a few hundred batches on every node with the best checkpoint
   (:class:`~dckpt.predict.BatchPredictor`): each node materializes it once.
5. Report what moved where, the resume point and the accuracy.

Everything runs on this machine, needs no network, and is removed at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import distributed

from dckpt import _config
from dckpt.cluster import NodeCluster, stats
from dckpt.demo._toy import ToyPredictor, accuracy, make_data, rank_0_reported, train_loop
from dckpt.predict import BatchPredictor
from dckpt.train import CheckpointConfig, DataParallelTrainer, Result

logger = logging.getLogger(__name__)

__all__ = ["KILL_AFTER_EPOCH", "DemoReport", "run_demo", "train_with_a_kill"]

EPOCHS = 24
KILL_AFTER_EPOCH = 8
EPOCH_SECONDS = 0.1


@dataclass
class DemoReport:
    """What the demo measured; :meth:`lines` renders it."""

    nodes: int
    isolated: bool = False
    seconds: float = 0.0
    failures: int = 0
    killed_node: str | None = None
    resumed_at_epoch: int | None = None
    final_loss: float = float("nan")
    best: list[tuple[int, float]] = field(default_factory=list)  # (epoch, loss), best first
    batches: int = 0
    accuracy: float = float("nan")
    # By node id: the store's counters after training, and what prediction added.
    after_training: dict[str, dict[str, int]] = field(default_factory=dict)
    by_prediction: dict[str, dict[str, int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The report as lines of text."""
        out = [
            (f"dckpt demo: {self.nodes} {'isolated' if self.isolated else 'NOT isolated'} "
            f"nodes, {self.seconds:.1f} s"),
            (f"training: 2 ranks; {self.killed_node} killed after epoch {KILL_AFTER_EPOCH}; "
            f"{self.failures} failure(s) survived; resumed at epoch {self.resumed_at_epoch}; "
            f"final loss {self.final_loss:.4f}"),
            "best checkpoints kept, best first: " + ", ".join(
                f"epoch {epoch} (loss {loss:.4f})" for epoch, loss in self.best),
            (f"batch prediction: {self.batches} batches on every node with the best "
            f"checkpoint; accuracy {self.accuracy:.3f}"),
            "checkpoint bytes moved between nodes (a restarted node's counters start again):",
            (f"{'node':<8} {'training: transfers':>20} {'bytes in':>9} {'bytes out':>9}"
            f"   {'prediction: transfers':>22} {'bytes in':>9} {'bytes out':>9}"),
        ]
        empty = dict.fromkeys(_COUNTERS, 0)
        for node_id in sorted({*self.after_training, *self.by_prediction}):
            train = self.after_training.get(node_id, empty)
            predict = self.by_prediction.get(node_id, empty)
            out.append(
                f"{node_id:<8} {train['transfers']:>20} {train['bytes_received']:>9} "
                f"{train['bytes_sent']:>9}   {predict['transfers']:>22} "
                f"{predict['bytes_received']:>9} {predict['bytes_sent']:>9}"
            )
        return out


def run_demo(
    nodes: int = 3, batches: int = 300, out: Callable[[str], Any] | None = print
) -> DemoReport:
    """Tell the story of this module's docstring; print progress lines to ``out``."""
    say = out or (lambda line: None)
    report = DemoReport(nodes=nodes)
    started = time.perf_counter()
    storage = tempfile.mkdtemp(prefix="dckpt-demo-", dir=_config.temporary_directory())
    try:
        # Two threads per worker: a rank of the failed attempt still waiting for its
        # dead peer must not hold up the new attempt's rank on the same worker.
        # Isolated where the kernel allows (a warning says when it does not): then
        # a node cannot read another's files, and every byte moved is counted.
        with NodeCluster(nodes, isolate=None, threads_per_worker=2) as cluster, \
                cluster.client() as client:
            report.isolated = cluster.isolated
            say(f"started {nodes} {'isolated ' if cluster.isolated else ''}nodes: "
                f"{cluster.scheduler_address}")
            result = _train(cluster, client, storage, report, say)
            _summarize_training(result, report)
            best = result.best_checkpoints[-1][0]  # worst first, as in Ray
            say(f"scoring {batches} batches on every node with the checkpoint of epoch "
                f"{report.best[0][0]}")
            report.after_training = _per_node(client)
            report.accuracy = accuracy(_predict(client, best, batches))
            report.batches = batches
            report.by_prediction = _minus(_per_node(client), report.after_training)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    for line in report.lines():
        say(line)
    return report


def train_with_a_kill(
    cluster: NodeCluster,
    client: distributed.Client,
    storage_uri: str,
    *,
    epochs: int,
    epoch_seconds: float,
    num_to_keep: int,
    on_kill: Callable[[str], Any],
    train_loop_per_worker: Callable[[dict[str, Any]], Any] = train_loop,
    train_loop_config: Mapping[str, Any] | None = None,
    setup_torch_distributed: bool = False,
) -> tuple[Result, int | None]:
    """Train :func:`~dckpt.demo.train_loop` on 2 ranks, killing rank 1's node mid-run.

    Rank 1 names its node after epoch :data:`KILL_AFTER_EPOCH` (through a Dask
    Variable, :func:`~dckpt.demo.offer_node_for_kill`); once rank 0 has reported
    that epoch too, a driver thread calls ``on_kill(node_id)`` and kills that node,
    as a crash would. The trainer restarts both ranks from the latest checkpoint,
    that epoch's. Keeps the best ``num_to_keep`` by loss, persisted to
    ``storage_uri``. Returns the result and the index of the node killed
    (None if it never was); the caller restarts it if it wants it back. Used by
    ``dckpt demo``, ``examples/train_data_parallel.py`` and, with its own
    ``train_loop_per_worker`` (which must call ``offer_node_for_kill`` and report
    ``loss``), ``train_loop_config`` (merged over the toy's) and
    ``setup_torch_distributed=True``, ``examples/train_torch_ddp.py``.
    """
    victim = f"dckpt-demo-victim-{os.getpid()}-{time.monotonic_ns()}"
    killed: list[int] = []

    def kill_when_asked() -> None:
        node_id = str(distributed.Variable(victim, client=client).get(timeout=120))
        # Not before rank 0's checkpoint of that epoch counts (offer_node_for_kill).
        if not distributed.Event(rank_0_reported(victim), client=client).wait(timeout=120):
            logger.warning("Rank 0 did not report epoch %d within 120 s; killing %s anyway",
                           KILL_AFTER_EPOCH, node_id)
        index = next(i for i, info in enumerate(cluster.nodes) if info.node_id == node_id)
        on_kill(node_id)
        cluster.kill_node(index)
        killed.append(index)

    killer = threading.Thread(target=kill_when_asked, name="dckpt-demo-killer", daemon=True)
    killer.start()
    try:
        result = DataParallelTrainer(
            train_loop_per_worker,
            train_loop_config={"epochs": epochs, "lr": 0.5, "momentum": 0.5,
                               **(train_loop_config or {}),
                               "epoch_seconds": epoch_seconds, "victim": victim,
                               "kill_after": KILL_AFTER_EPOCH},
            num_workers=2, max_failures=2, client=client,
            setup_torch_distributed=setup_torch_distributed,
            checkpoint_config=CheckpointConfig(
                num_to_keep=num_to_keep, checkpoint_score_attribute="loss",
                checkpoint_score_order="min", storage_uri=storage_uri,
            ),
        ).fit()
    finally:
        killer.join(timeout=5)
        distributed.Variable(victim, client=client).delete()
        distributed.Event(rank_0_reported(victim), client=client).clear()  # deletes it
    return result, killed[0] if killed else None


def print_loss_curve(result: Result) -> None:
    """Print rank 0's loss curve attempt by attempt, and whether a resume continued it.

    For the training examples, whose loop reports ``epoch``, ``loss``, ``node_id`` and
    ``resumed_from`` (the epoch an attempt started at, None for a fresh start).
    """
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
    resumed = [m for m in rank0 if m["attempt"] > 0]
    if resumed:
        before = [m for m in rank0 if m["attempt"] == 0 and m["epoch"] < resumed[0]["epoch"]]
        print(f"loss at the start {rank0[0]['loss']:.4f}; last before the failure "
              f"{before[-1]['loss']:.4f}; first after the resume {resumed[0]['loss']:.4f}: "
              "the curve continues, it did not restart")


def _train(
    cluster: NodeCluster, client: distributed.Client, storage: str, report: DemoReport,
    say: Callable[[str], Any],
) -> Result:
    def on_kill(node_id: str) -> None:
        report.killed_node = node_id
        say(f"killing {node_id}, which runs rank 1, after epoch {KILL_AFTER_EPOCH}")

    say(f"training 2 ranks for {EPOCHS} epochs, keeping the best 2 checkpoints")
    result, killed = train_with_a_kill(
        cluster, client, f"file://{storage}", epochs=EPOCHS, epoch_seconds=EPOCH_SECONDS,
        num_to_keep=2, on_kill=on_kill,
    )
    if killed is not None:  # back for the prediction, with what its disk held
        cluster.restart_node(killed)
    return result


def _summarize_training(result: Result, report: DemoReport) -> None:
    rank0 = [m for m in result.metrics_history if m["world_rank"] == 0]
    resumed = [m["resumed_from"] for m in rank0 if m["attempt"] > 0]
    report.failures = result.failures
    report.resumed_at_epoch = resumed[0] if resumed else None
    report.final_loss = float(result.metrics["loss"]) if result.metrics else float("nan")
    # Shown best first; Result.best_checkpoints lists them worst first, as in Ray.
    report.best = [(int(m["epoch"]), float(m["loss"]))
                   for _, m in reversed(result.best_checkpoints)]


def _predict(client: distributed.Client, checkpoint: Any, batches: int) -> list[Any]:
    """Every batch scored where a predictor is loaded; the checkpoint once per node."""
    with BatchPredictor(checkpoint, ToyPredictor) as predictor:
        futures = predictor.predict(_batches(batches), client=client,
                                    min_scoring_workers=len(client.nthreads()))
        results: list[Any] = client.gather(futures)
    return results


def _batches(count: int, rows: int = 20) -> list[dict[str, list[Any]]]:
    data = make_data(seed=1, n=count * rows)
    return [{"x": [x for x, _ in data[i:i + rows]], "y": [y for _, y in data[i:i + rows]]}
            for i in range(0, len(data), rows)]


_COUNTERS = ("transfers", "bytes_received", "bytes_sent")


def _per_node(client: distributed.Client) -> dict[str, dict[str, int]]:
    """The stores' counters, summed by node."""
    rows: dict[str, dict[str, int]] = {}
    for counters in stats(client).values():
        row = rows.setdefault(str(counters["node_id"]), dict.fromkeys(_COUNTERS, 0))
        for name in _COUNTERS:
            row[name] += int(counters[name])
    return rows


def _minus(
    later: dict[str, dict[str, int]], earlier: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    return {node_id: {name: value - earlier.get(node_id, {}).get(name, 0)
                      for name, value in row.items()}
            for node_id, row in later.items()}

