"""After a cluster test, every node is clean: no pins, no transfers, no partial writes.

Issue 14: a test that leaves a pin (a checkpoint its cache can never evict), a pull
still served, a copy still coming in, or a staging directory in a node's cache has
found a leak, whatever it asserted itself. :func:`assert_nodes_clean` waits (bounded)
for work a test started but did not wait for to finish, then fails naming what is
left on which node. The session's and the three-node fixtures call it after each test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from distributed import Client

from dckpt._node import cache_directory
from dckpt.cluster._cache_names import is_leftover
from dckpt.cluster._store import store_of
from tests._waiting import eventually


def _partial_writes() -> list[str]:
    """On a worker: the staging and set-aside directories in this node's cache."""
    root = cache_directory()
    return sorted(name for name in os.listdir(root) if is_leftover(name))


def leftovers(client: Client, addresses: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{address: {what: ...}}`` of what is left on each node's store and cache."""
    workers = set(client.scheduler_info(n_workers=-1)["workers"])
    live = [a for a in addresses if a in workers]
    partial = client.run(_partial_writes, workers=live) if live else {}
    found: dict[str, dict[str, Any]] = {}
    for address in live:
        holdings = store_of(address, client).holdings().result()
        left = {
            "pinned": holdings["pinned"],
            "serving": holdings["serving"],
            "obtaining": holdings["obtaining"],
            "partial writes": partial.get(address, []),
        }
        left = {what: value for what, value in left.items() if value}
        if left:
            found[address] = left
    return found


def assert_nodes_clean(client: Client, addresses: Sequence[str]) -> None:
    """Fail unless every node at ``addresses`` is clean (waiting, bounded, for it)."""
    eventually(lambda: leftovers(client, addresses), lambda left: not left,
               "every node clean after the test (no pins, transfers or partial writes)")
