"""Which nodes already hold a checkpoint, so that predictors can be placed there first.

Asked of the scheduler's registry through the public :func:`dckpt.cluster.who_has`; not
:mod:`dckpt.cluster._holders`, which orders the holders a store fetches from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from distributed import Client

from dckpt._checkpoint import Checkpoint
from dckpt.cluster import who_has

__all__ = ["holder_nodes"]

logger = logging.getLogger(__name__)


def holder_nodes(client: Client, checkpoint: Checkpoint, workers: Mapping[str, str]) -> list[str]:
    """Node ids that hold ``checkpoint``: its owner first, then nodes with a cached copy.

    ``workers`` is ``{address: node id}`` of the workers alive. Empty for a checkpoint
    that is no node reference. Without the scheduler's registry (not installed, or
    unreachable) only the owner is known: placement is a preference, not worth failing
    for.
    """
    kind, ref = checkpoint.get_internal_representation()
    if kind != "node_ref":
        return []
    holders = [ref.node_id]
    try:
        places = who_has(client, [ref.checkpoint_id])[ref.checkpoint_id]
    except Exception as e:  # noqa: BLE001 - see the docstring
        logger.debug("no registry to ask where %s is cached: %r", ref.checkpoint_id, e)
        return holders
    for address in places["origin"] + places["cached"]:
        if address in workers and workers[address] not in holders:
            holders.append(workers[address])
    return holders
