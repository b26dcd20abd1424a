"""Which workers score a batch prediction: where the checkpoint already is, first.

Pure: it sees worker addresses, node ids and the nodes that hold the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dckpt.errors import ScoringWorkersError

__all__ = ["choose_scoring_workers"]


def choose_scoring_workers(
    workers: Mapping[str, str],
    holders: Sequence[str],
    *,
    min_workers: int = 1,
    max_workers: int | None = None,
) -> list[str]:
    """The scoring workers, in order of preference.

    Parameters
    ----------
    workers
        ``{worker address: node id}`` of the workers alive.
    holders
        Node ids that hold the checkpoint already, best first (the owner, then nodes
        with a cached copy). Their workers come first: they score without moving a
        byte of the checkpoint.
    min_workers, max_workers
        How many workers to use at least and at most (``None``: all of them).

    Returns
    -------
    list of str
        Workers of holder nodes (in the order of ``holders``), then the other workers
        grouped by node, so that every further node adds all its workers for the one
        transfer it costs. Deterministic for the same input.

    Raises
    ------
    ScoringWorkersError
        Fewer than ``min_workers`` workers.
    ValueError
        ``min_workers`` below 1, or ``max_workers`` below ``min_workers``.
    """
    if min_workers < 1:
        raise ValueError(f"min_scoring_workers must be at least 1, not {min_workers}")
    if max_workers is not None and max_workers < min_workers:
        raise ValueError(
            f"max_scoring_workers ({max_workers}) is below min_scoring_workers ({min_workers})"
        )
    if len(workers) < min_workers:
        raise ScoringWorkersError(
            f"{min_workers} scoring workers are needed and the cluster has {len(workers)}; "
            "add workers or lower min_scoring_workers"
        )
    rank = {node_id: i for i, node_id in reversed(list(enumerate(holders)))}
    order = sorted(
        workers, key=lambda address: (rank.get(workers[address], len(rank)), workers[address], address)
    )
    return order if max_workers is None else order[:max_workers]
