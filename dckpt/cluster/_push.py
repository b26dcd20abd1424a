"""Push a driver's directory to a worker's store; have nodes' stores materialize it.

The cluster half of ``dckpt.put`` (:mod:`dckpt._put`): :func:`workers_of`,
:func:`push_directory`, :func:`materialize_on`. :func:`push_for_pickling` is what a
large directory checkpoint pickled on the driver uses (``Checkpoint.__getstate__``):
the driver has no store that others could fetch from, so it sends the data to one
worker's store and travels as a reference to that copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from distributed import Client

from dckpt import _transfer
from dckpt.cluster import _stream
from dckpt.cluster._core import CheckpointId, NodeRef
from dckpt.cluster._store import store_of
from dckpt.cluster._workers import worker_nodes

__all__ = ["materialize_on", "push_directory", "push_for_pickling", "workers_of"]

logger = logging.getLogger(__name__)


def push_for_pickling(path: str, uris: tuple[str, ...]) -> NodeRef | None:
    """Push a driver's directory to one worker's store; a reference to it, or None.

    None when there is no cluster to push to: no current client (``Client.current()``:
    the one of an ``as_current()`` block, else the default one), an asynchronous one,
    or a call on the client's own event loop (pickling there cannot wait for a
    transfer). A failed push is logged and also gives None: the caller falls back to
    a staging URI or inline data. The worker is chosen by the content's digest, so the
    same checkpoint pickled again goes to the same store, which then moves no byte.
    """
    try:
        client = Client.current(allow_global=True)
    except ValueError:
        return None
    if client.asynchronous or _in_event_loop():
        return None
    try:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        if not workers:
            return None
        manifest = _transfer.build_manifest(path)
        address = workers[int(manifest.digest, 16) % len(workers)]
        return push_directory(client, path, manifest, address, uris)
    except Exception as e:  # noqa: BLE001 - pickling must not fail for want of a push
        logger.warning("could not push %s to a worker's store (%r); sending it otherwise",
                       path, e)
        return None


def materialize_on(client: Client, ref: NodeRef, targets: Sequence[tuple[str, str]]) -> None:
    """Have the store of each ``(node id, address)`` of ``targets`` but the reference's
    own node materialize ``ref`` as a task there would: from any holder, at once."""
    fetches = [store_of(address, client).materialize(ref)
               for node_id, address in targets if node_id != ref.node_id]
    for fetch in fetches:
        fetch.result()


def push_directory(
    client: Client, path: str, manifest: _transfer.Manifest, address: str,
    uris: tuple[str, ...],
) -> NodeRef:
    """Push the directory at ``path`` to the store at ``address``; a reference to it
    carrying ``uris``."""
    checkpoint_id = CheckpointId(manifest.content_id)  # the same content is the same checkpoint
    with _transfer.ChunkSource(path, manifest) as source:
        reply = client.sync(_stream.push, client.rpc, address, checkpoint_id, source)
    logger.info("pushed %s (%d bytes) to the store of %s", path, manifest.total_bytes, address)
    return NodeRef(
        node_id=str(reply["node_id"]),
        path=str(reply["path"]),
        checkpoint_id=checkpoint_id,
        size=manifest.total_bytes,
        digest=manifest.digest,
        store_address=address,
        uris=tuple(uris),
    )


def workers_of(client: Client, nodes: Sequence[str] | None) -> list[tuple[str, str]]:
    """``(node id, worker address)``, one worker per node asked for, in that order."""
    node_of = worker_nodes(client)
    by_node: dict[str, str] = {}
    for address in sorted(node_of):
        by_node.setdefault(node_of[address], address)
    if nodes is None:
        return sorted(by_node.items())
    if isinstance(nodes, str):
        nodes = [nodes]
    chosen: dict[str, str] = {}
    for name in nodes:
        if name in by_node:
            chosen.setdefault(name, by_node[name])
        elif name in node_of:
            chosen.setdefault(node_of[name], name)
        else:
            raise ValueError(
                f"{name!r} is neither a node id nor a worker address of this cluster; "
                f"its nodes are {sorted(by_node)}"
            )
    if not chosen:
        raise ValueError("put() needs at least one node")
    return list(chosen.items())


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
