"""``dckpt demo``: the whole idea on a local cluster, and the toy model it trains.

:func:`run_demo` starts an isolated :class:`~dckpt.cluster.NodeCluster`, trains a small
model data-parallel with checkpoints, kills a node and resumes, keeps the best two,
batch-predicts on every node with locality, and reports what moved where.
"""

from __future__ import annotations

from dckpt.demo._story import (
    KILL_AFTER_EPOCH,
    DemoReport,
    print_loss_curve,
    run_demo,
    train_with_a_kill,
)
from dckpt.demo._toy import offer_node_for_kill, train_loop

# What the examples share with the demo (examples/train_*.py), and the demo itself.
__all__ = [
    "KILL_AFTER_EPOCH",
    "DemoReport",
    "offer_node_for_kill",
    "print_loss_curve",
    "run_demo",
    "train_loop",
    "train_with_a_kill",
]
