"""``dckpt demo``: the whole idea of dckpt on a local isolated cluster, in one command.

Runs :func:`dckpt.demo.run_demo`: train a small model data-parallel with checkpoints,
kill a node and resume, keep the best two, batch-predict on every node with locality,
and print a short report. No network, nothing to install beyond dckpt.
"""

from __future__ import annotations

import argparse
import logging

from dckpt.cli._output import at_least

NAME = "demo"
SUMMARY = "train, survive a killed node, predict on every node"
DESCRIPTION = """\
The end-to-end story on a local cluster whose nodes share no disk (mount namespaces;
distinct folders where the kernel refuses, with a warning):

  1. train a logistic regression on 2 ranks, a checkpoint per epoch on rank 0's node;
  2. kill the node of rank 1 mid-training: both ranks restart and resume from the
     latest checkpoint, fetched from the node that wrote it;
  3. keep the best 2 checkpoints by loss (the others are deleted where they live);
  4. score a few hundred batches on every node with the best checkpoint: each node
     materializes it once;
  5. report the resume point, the accuracy and what moved between which nodes.

About 15 s on 2 cores; everything it starts or writes is gone at the end.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``demo``."""
    parser.add_argument("--nodes", type=at_least(3, "the demo kills one of two training "
                                                   "nodes and predicts on all"),
                        default=3, help="how many nodes, at least 3 (default 3)")
    parser.add_argument("--batches", type=at_least(1), default=300,
                        help="how many batches to score (default 300)")


def run(args: argparse.Namespace) -> int:
    from dckpt.demo import run_demo  # imports distributed: only here

    if not args.debug:
        # The trainer's restart warning is part of the story; the rest is noise here.
        logging.basicConfig(level=logging.WARNING, format="  (%(name)s) %(message)s")
        logging.getLogger("distributed").setLevel(logging.CRITICAL)
    run_demo(nodes=args.nodes, batches=args.batches, out=lambda line: print(line, flush=True))
    return 0
