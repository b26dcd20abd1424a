"""Stage a checkpoint on chosen nodes before tasks there use it; push the driver's data.

:func:`put` is the public entry (``dckpt.put``). :func:`push_for_pickling` is what a
large directory checkpoint pickled on the driver uses (``Checkpoint.__getstate__``):
the driver has no store that others could fetch from, so it sends the data to one
worker's store and travels as a reference to that copy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from distributed import Client, get_client

from dckpt import _config, _node, _transfer
from dckpt._sources import LocalDirectory
from dckpt.cluster import _stream
from dckpt.cluster._core import CheckpointId, NodeRef
from dckpt.cluster._store import store_of

if TYPE_CHECKING:
    from dckpt.checkpoint import Checkpoint

__all__ = ["push_for_pickling", "put"]

logger = logging.getLogger(__name__)


def put(
    checkpoint: Checkpoint,
    nodes: Sequence[str] | None = None,
    *,
    client: Client | None = None,
) -> Checkpoint:
    """Copy ``checkpoint`` into the cache of each of ``nodes`` now, ahead of its use there.

    Tasks on those nodes then find it in their node's cache and move no byte. A
    checkpoint that lives on a worker (it was returned by a task) is fetched by each
    node's store from its owner; any other (a directory, dict, bytes or URI checkpoint
    of the driver) is first pushed from the driver to the store of the first node, and
    the others fetch it from there.

    Parameters
    ----------
    checkpoint
        Any checkpoint.
    nodes
        Node ids (``dckpt.node-id`` of the workers) or worker addresses; ``None`` means
        every node of the cluster. A node with several workers is served by one of them
        (the cache is per node).
    client
        The client of the cluster; the default client when ``None``.

    Returns
    -------
    Checkpoint
        A checkpoint of the same class, metadata and preprocessor whose data is the
        staged copy: pickled, it travels as a reference of a few hundred bytes. Staged
        copies live in node caches, within ``dckpt.cache.max-bytes``: one the cache
        evicts is fetched again from the owner, or from the URIs the checkpoint is known
        at (persist it with ``to_uri`` to survive losing the node).

    Raises
    ------
    ValueError
        A node id or address that is not in the cluster, or an empty ``nodes``.
    CheckpointUnavailableError, CheckpointError, OSError
        The data could not be had or sent.
    """
    # put() is dckpt.put, an entry of the API layer beside the push it drives: it reads
    # the checkpoint through checkpoint.py's developer API, imported at call time so
    # that importing dckpt.cluster does not import the layer above it.
    from dckpt.checkpoint import node_ref_of, with_node_ref

    client = client or get_client()
    targets = _workers_of(client, nodes)
    # A worker's checkpoint the driver has read already still comes from its owner.
    ref = node_ref_of(checkpoint)
    if ref is None:
        ref = _push(client, checkpoint, targets[0][1])
    # Each node's store materializes it as a task there would: from any holder.
    fetches = [
        store_of(address, client).materialize(ref)
        for node_id, address in targets
        if node_id != ref.node_id
    ]
    for fetch in fetches:
        fetch.result()
    return with_node_ref(checkpoint, ref)


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
        return _push_directory(client, path, manifest, address, uris)
    except Exception as e:  # noqa: BLE001 - pickling must not fail for want of a push
        logger.warning("could not push %s to a worker's store (%r); sending it otherwise",
                       path, e)
        return None


def _push(client: Client, checkpoint: Checkpoint, address: str) -> NodeRef:
    """Push the driver-side ``checkpoint`` to the store at ``address``.

    A directory is pushed as it is; a dict or URI checkpoint is written to a scratch
    directory first. The reference carries the URIs the checkpoint is persisted at.
    """
    from dckpt.checkpoint import source_of  # see put()

    source = source_of(checkpoint)
    if isinstance(source, LocalDirectory):
        return _push_directory(client, source.path, _transfer.build_manifest(source.path),
                               address, source.uris)
    scratch = tempfile.mkdtemp(prefix="dckpt-put-", dir=_config.temporary_directory())
    try:
        directory = checkpoint.to_directory(os.path.join(scratch, "data"))
        return _push_directory(client, directory, _transfer.build_manifest(directory),
                               address, source.uris)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _push_directory(
    client: Client, path: str, manifest: _transfer.Manifest, address: str,
    uris: tuple[str, ...],
) -> NodeRef:
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


def _workers_of(client: Client, nodes: Sequence[str] | None) -> list[tuple[str, str]]:
    """``(node id, worker address)``, one worker per node asked for, in that order."""
    node_of: dict[str, Any] = client.run(_node.node_id)
    by_node: dict[str, str] = {}
    for address in sorted(node_of):
        by_node.setdefault(str(node_of[address]), address)
    if nodes is None:
        return sorted(by_node.items())
    if isinstance(nodes, str):
        nodes = [nodes]
    chosen: dict[str, str] = {}
    for name in nodes:
        if name in by_node:
            chosen.setdefault(name, by_node[name])
        elif name in node_of:
            chosen.setdefault(str(node_of[name]), name)
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
