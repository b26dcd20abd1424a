"""Forget a node reference everywhere: its directory on the owning node and every cached copy.

Used when a checkpoint is no longer wanted (a training run's checkpoint manager drops
it from its top K). :func:`forget` runs on the client; :func:`_forget_here` runs on
each worker, through ``client.run``, on the worker's event loop, with the file work in
a thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed import Client
from distributed.worker import Worker

from dckpt import _compat
from dckpt.cluster._core import NodeRef
from dckpt.cluster._store import STORE_KEY, NodeStore, forget_here

logger = logging.getLogger(__name__)

__all__ = ["forget"]


def forget(ref: NodeRef, client: Client) -> dict[str, dict[str, bool]]:
    """Remove the checkpoint of ``ref`` from the cluster: the owner's directory and every cache.

    On every worker with a store: the worker that has ``ref.checkpoint_id`` registered
    stops serving it and deletes its directory, but only when the registered path is
    ``ref.path`` (a registration of another directory under that id, one with the same
    content, stays served and is left alone);
    every worker evicts the id from its node's cache. A copy pinned by a user at that
    moment stays (the cache never evicts what is in use); it goes as the least recently
    used once unpinned. Workers that cannot be reached are skipped (logged).

    Returns
    -------
    dict
        By worker address: ``{"removed": bool, "evicted": bool}``.
    """
    replies = client.run(_forget_here, ref, on_error="return")
    done: dict[str, dict[str, bool]] = {}
    for address, reply in replies.items():
        if isinstance(reply, BaseException):
            logger.info("could not forget %r on %s: %r", ref, address, reply)
        elif reply is not None:
            done[address] = reply
    logger.debug("forgot %r: %s", ref, done)
    return done


async def _forget_here(ref: NodeRef, dask_worker: Worker) -> dict[str, Any] | None:
    """On a worker (event loop): unregister and delete if this is the owner; evict."""
    store = _compat.actor_instance(dask_worker, STORE_KEY)
    if not isinstance(store, NodeStore):
        return None  # a worker without dckpt holds nothing of it
    # Removing a directory and the cache's index writes are file work: not on the loop.
    return await asyncio.to_thread(forget_here, store, ref)
