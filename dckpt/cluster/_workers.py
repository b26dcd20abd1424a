"""The workers of a cluster and their node ids, waiting for enough of them.

Client side, in the caller's thread. One home for ``{worker address: node id}``: the
trainer seats its ranks by it, the batch predictor and the deployment place
predictors by it, ``dckpt.put`` turns node ids into workers with it. The node ids come
from the scheduler's registry (:func:`~dckpt.cluster.registry`, one request), which
learns a worker's node from its store's reports; a worker the registry has no node id
for yet (it joined a moment ago), or every worker of a cluster without the registry,
is asked itself (``client.run``), as the callers did before this module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from dask.utils import parse_timedelta
from distributed import Client

from dckpt import _node
from dckpt.cluster._scheduler_plugin import registry

__all__ = ["worker_nodes"]

logger = logging.getLogger(__name__)


def worker_nodes(
    client: Client,
    at_least: int = 0,
    *,
    timeout: float | str = 0,
    setting: str | None = None,
    nthreads: float = 1,
    resources: Mapping[str, float] | None = None,
    interval: float = 0.1,
) -> dict[str, str]:
    """``{worker address: node id}`` of the workers alive, once there are ``at_least``.

    Parameters
    ----------
    client
        A synchronous client of the cluster.
    at_least
        Wait until at least this many workers (of those that count) are alive and
        known by node; 0 answers at once.
    timeout
        How long to wait for them: seconds, or a Dask time string (``"30s"``).
    setting
        The setting ``timeout`` was read from (``"dckpt.train.worker-wait-timeout"``),
        named in the error so that its reader knows what to change.
    nthreads, resources
        Only workers with at least ``nthreads`` threads and at least these amounts of
        Dask worker resources count, and only they are returned.
    interval
        Seconds between two looks at the cluster while waiting.

    Returns
    -------
    dict
        Every such worker by address, with its node id (``dckpt.node-id``). A worker
        that leaves while it is asked is left out (and the count checked again).

    Raises
    ------
    TimeoutError
        Fewer than ``at_least`` such workers after ``timeout``; the message says how
        many there were, what they needed, how long it waited and ``setting``.

    Examples
    --------
    >>> worker_nodes(client)  # doctest: +SKIP
    {'tcp://10.0.0.2:40111': 'node-0', 'tcp://10.0.0.3:40123': 'node-1'}
    """
    wait = parse_timedelta(timeout, default="s") or 0.0
    deadline = time.monotonic() + wait
    logged = False
    while True:
        nodes = _nodes(client, nthreads, dict(resources or {}))
        if len(nodes) >= at_least:
            return nodes
        if time.monotonic() >= deadline:
            where = f" ({setting})" if setting else ""
            raise TimeoutError(
                f"the cluster has {len(nodes)} workers{_needs(nthreads, resources)} after "
                f"waiting {wait:g} s{where}"
            )
        if not logged:
            logger.info("Waiting up to %g s for %d workers%s", wait, at_least,
                        _needs(nthreads, resources))
            logged = True
        time.sleep(interval)


def _nodes(client: Client, nthreads: float, resources: dict[str, float]) -> dict[str, str]:
    """``{address: node id}`` of the workers alive that count, as known now."""
    try:
        known = {address: info["node_id"] for address, info in registry(client).items()}
    except RuntimeError:  # no registry on this scheduler: every worker is asked
        known = {address: None for address in client.nthreads()}
    if resources or nthreads > 1:
        counted = set(_fitting(client, nthreads, resources))
        # A worker that joined after the registry answered is asked like any unknown one.
        known = {address: known.get(address) for address in counted}
    nodes = {address: str(node_id) for address, node_id in known.items() if node_id is not None}
    unknown = sorted(address for address, node_id in known.items() if node_id is None)
    if unknown:
        answers = client.run(_node.node_id, workers=unknown, on_error="ignore")
        nodes.update({address: str(node_id) for address, node_id in answers.items()})
    return nodes


def _fitting(client: Client, nthreads: float, resources: dict[str, float]) -> list[str]:
    """The workers with at least ``nthreads`` threads and ``resources``."""
    fit = []
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        have = info.get("resources") or {}
        if info.get("nthreads", 0) >= nthreads and all(
            have.get(name, 0) >= amount for name, amount in resources.items()
        ):
            fit.append(address)
    return fit


def _needs(nthreads: float, resources: Mapping[str, float] | None) -> str:
    """`` with 2 threads, GPU=1`` for what a counted worker needs; empty for nothing."""
    needs = [f"{nthreads:g} threads"] if nthreads > 1 else []
    needs += [f"{name}={amount:g}" for name, amount in sorted((resources or {}).items())]
    return f" with {', '.join(needs)}" if needs else ""
