"""The end-to-end demo (dckpt.demo.run_demo) on a local isolated cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import distributed
import pytest

from dckpt import Checkpoint
from dckpt.cluster import isolation_available
from dckpt.demo import offer_node_for_kill, run_demo, train_with_a_kill
from dckpt.demo._story import KILL_AFTER_EPOCH
from dckpt.demo._toy import all_reduce_mean
from dckpt.train import get_checkpoint, get_context, report, stop_requested
from tests._nodes import isolated_cluster

pytestmark = pytest.mark.slow


def test_the_demo_trains_survives_a_kill_and_predicts_once_per_node():
    if not isolation_available():
        pytest.skip("the demo runs an isolated NodeCluster")
    lines: list[str] = []
    report = run_demo(nodes=3, batches=60, out=lines.append)

    assert report.isolated  # skipped above where it cannot be
    assert report.failures == 1 and report.killed_node is not None
    assert report.resumed_at_epoch == KILL_AFTER_EPOCH + 1  # not 0: it resumed
    assert len(report.best) == 2
    assert report.best[0][1] <= report.best[1][1]  # best first, by loss
    assert report.accuracy > 0.8
    # Prediction: every node had the checkpoint at most once, and someone sent it.
    assert set(report.by_prediction) == {"node-0", "node-1", "node-2"}
    assert all(row["transfers"] <= 1 for row in report.by_prediction.values())
    assert sum(row["bytes_sent"] for row in report.by_prediction.values()) == sum(
        row["bytes_received"] for row in report.by_prediction.values()) > 0
    assert lines[-len(report.lines()):] == report.lines()


_REPORT_HELD_SECONDS = 5.0  # long enough for a kill to stop the attempt, were it not held


def _rank_0_reports_late(config: dict[str, Any]) -> None:
    """Two ranks in step; rank 0 holds back its report of the kill's epoch.

    It waits until rank 1 has offered its node for the kill, then until its attempt
    is stopped or ``_REPORT_HELD_SECONDS`` pass: a driver that killed on rank 1's
    offer alone would stop the attempt meanwhile, and that report would not count.
    """
    context = get_context()
    checkpoint = get_checkpoint()
    resumed_from = None if checkpoint is None else checkpoint.to_dict()["epoch"] + 1
    for epoch in range(resumed_from or 0, config["epochs"]):
        all_reduce_mean([float(epoch)], f"epoch-{epoch}")
        saved = None
        if context.world_rank == 0:
            if resumed_from is None and epoch == config["kill_after"]:
                distributed.Variable(config["victim"]).get(timeout=60)
                deadline = time.monotonic() + _REPORT_HELD_SECONDS
                while not stop_requested() and time.monotonic() < deadline:
                    distributed.Event(f"{config['victim']}-never-set").wait(0.1)
            saved = Checkpoint.from_dict({"epoch": epoch})
        report({"epoch": epoch, "loss": 1.0 / (epoch + 1), "resumed_from": resumed_from,
                "node_id": context.node_id}, checkpoint=saved)
        offer_node_for_kill(config, epoch, resumed_from)


def test_the_node_dies_only_once_rank_0_has_reported_that_epoch(tmp_path: Path):
    with isolated_cluster(3, threads_per_worker=2) as cluster, \
            cluster.client(set_as_default=False) as client:
        killed: list[str] = []
        result, index = train_with_a_kill(
            cluster, client, tmp_path.as_uri(), epochs=KILL_AFTER_EPOCH + 3,
            epoch_seconds=0.0, num_to_keep=2, on_kill=killed.append,
            train_loop_per_worker=_rank_0_reports_late,
        )
    assert index is not None and killed == [cluster.nodes[index].node_id]
    assert result.failures == 1
    resumed = [m["resumed_from"] for m in result.metrics_history if m["attempt"] == 1]
    assert resumed and set(resumed) == {KILL_AFTER_EPOCH + 1}
