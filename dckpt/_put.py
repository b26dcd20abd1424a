"""``dckpt.put``: stage a checkpoint on chosen nodes before tasks there use it.

The API half: it reads the checkpoint (its source, its node reference) and writes a
driver's data to a directory; the cluster half (:mod:`dckpt.cluster._push`) pushes a
directory to a store and has each node's store materialize a reference.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dckpt import _config, _transfer
from dckpt._checkpoint import Checkpoint, node_ref_of, source_of, with_node_ref
from dckpt._sources import LocalDirectory

if TYPE_CHECKING:
    from distributed import Client

    from dckpt.cluster import NodeRef

__all__ = ["put"]


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
    # Both import distributed: only for those who call put.
    from distributed import get_client

    from dckpt.cluster import _push

    client = client or get_client()
    targets = _push.workers_of(client, nodes)
    # A worker's checkpoint the driver has read already still comes from its owner.
    ref = node_ref_of(checkpoint)
    if ref is None:
        ref = _push_from_driver(client, checkpoint, targets[0][1])
    # Each node's store materializes it as a task there would: from any holder.
    _push.materialize_on(client, ref, targets)
    return with_node_ref(checkpoint, ref)


def _push_from_driver(client: Client, checkpoint: Checkpoint, address: str) -> NodeRef:
    """Push the driver-side ``checkpoint`` to the store at ``address``.

    A directory is pushed as it is; a dict or URI checkpoint is written to a scratch
    directory first. The reference carries the URIs the checkpoint is persisted at.
    """
    from dckpt.cluster import _push

    source = source_of(checkpoint)
    if isinstance(source, LocalDirectory):
        return _push.push_directory(client, source.path,
                                    _transfer.build_manifest(source.path), address, source.uris)
    scratch = tempfile.mkdtemp(prefix="dckpt-put-", dir=_config.temporary_directory())
    try:
        directory = checkpoint.to_directory(os.path.join(scratch, "data"))
        return _push.push_directory(client, directory, _transfer.build_manifest(directory),
                                    address, source.uris)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
