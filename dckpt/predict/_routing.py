"""Where replicas go and which replica answers a request.

Pure: it sees worker addresses, node ids and counters, no cluster.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

__all__ = ["Routable", "choose_workers", "least_busy"]


class Routable(Protocol):
    """What routing reads of a replica."""

    @property
    def in_flight(self) -> int:
        """Requests sent to the replica and not answered yet (counted by the driver)."""

    @property
    def last_used(self) -> float:
        """``time.monotonic()`` when the replica was last given a request."""


R = TypeVar("R", bound=Routable)


def least_busy(replicas: Iterable[R]) -> R | None:
    """The replica with the fewest requests in flight; None when there is none.

    Ties go to the replica used longest ago, so that idle replicas take turns rather
    than the first one taking every sequential request.
    """
    return min(replicas, key=lambda r: (r.in_flight, r.last_used), default=None)


def choose_workers(
    count: int, workers: Mapping[str, str], taken: Iterable[str],
    preferred: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """Up to ``count`` free workers for new replicas, spread across nodes.

    Parameters
    ----------
    count
        How many replicas to place.
    workers
        ``{worker address: node id}`` of the workers alive.
    taken
        Addresses of the workers that already hold a replica; they get no other (the
        replicas of one worker would share its single actor thread).
    preferred
        Node ids that hold the checkpoint already, best first: among nodes with as few
        replicas, these come first (their replicas load without a transfer).

    Returns
    -------
    list of (address, node id)
        Each pick goes to the node with the fewest replicas so far (counting those on
        ``taken`` workers), ties broken by ``preferred`` order, then node id, then
        address, so that a node that fails takes as few replicas with it as it can. Shorter than ``count`` when
        there are not enough free workers. Deterministic for the same input.
    """
    taken = set(taken)
    order = {node_id: i for i, node_id in enumerate(preferred)}

    def rank(node_id: str) -> int:
        return order.get(node_id, len(order))

    per_node = Counter(workers[a] for a in taken if a in workers)
    free = [(node, address) for address, node in workers.items() if address not in taken]
    picks: list[tuple[str, str]] = []
    while free and len(picks) < count:
        node, address = min(free, key=lambda seat: (per_node[seat[0]], rank(seat[0]), seat))
        free.remove((node, address))
        per_node[node] += 1
        picks.append((address, node))
    return picks
