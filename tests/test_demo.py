"""The end-to-end demo (dckpt.demo.run_demo) on a local isolated cluster."""

from __future__ import annotations

import pytest

from dckpt.cluster import isolation_available
from dckpt.demo import run_demo
from dckpt.demo._story import KILL_AFTER_EPOCH

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
