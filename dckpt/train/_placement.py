"""Where the ranks of a training run go: one per worker, spread across nodes.

Pure: it sees worker addresses and node ids, no cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Placement", "place"]


@dataclass(frozen=True)
class Placement:
    """One rank's seat.

    Attributes
    ----------
    world_rank
        The rank, 0 to world size - 1.
    worker
        The address of the worker that runs it.
    node_id
        That worker's node id.
    node_rank
        The index of the node among the nodes of the run, in order of first use.
    local_rank
        The rank among the ranks on the same node, in order of world rank.
    local_world_size
        How many ranks run on that node.
    """

    world_rank: int
    worker: str
    node_id: str
    node_rank: int
    local_rank: int
    local_world_size: int


def place(num_workers: int, workers: Mapping[str, str]) -> list[Placement]:
    """Seat ``num_workers`` ranks on distinct workers, round-robin over nodes.

    Parameters
    ----------
    num_workers
        How many ranks.
    workers
        ``{worker address: node id}`` of the workers alive.

    Returns
    -------
    list of Placement
        Ordered by world rank. Rank ``i`` goes to the ``i``-th node (node ids sorted)
        in turn, skipping nodes whose workers are all taken, so that a failing node
        takes as few ranks with it as it can. Deterministic for the same input.

    Raises
    ------
    ValueError
        If there are fewer workers than ranks.
    """
    if num_workers > len(workers):
        raise ValueError(f"{num_workers} ranks need {num_workers} workers; {len(workers)} are alive")
    by_node: dict[str, list[str]] = {}
    for address, node in sorted(workers.items(), key=lambda item: (item[1], item[0])):
        by_node.setdefault(node, []).append(address)
    seats: list[tuple[str, str]] = []
    while len(seats) < num_workers:
        for node, free in by_node.items():
            if free and len(seats) < num_workers:
                seats.append((free.pop(0), node))
    node_order = list(dict.fromkeys(node for _, node in seats))
    per_node = {node: sum(1 for _, n in seats if n == node) for node in node_order}
    seen: dict[str, int] = {}
    placements = []
    for rank, (address, node) in enumerate(seats):
        placements.append(Placement(
            world_rank=rank, worker=address, node_id=node,
            node_rank=node_order.index(node), local_rank=seen.get(node, 0),
            local_world_size=per_node[node],
        ))
        seen[node] = seen.get(node, 0) + 1
    return placements
