"""Persisting one checkpoint to a URI, and deleting one wherever it lives.

Both run in the checkpoint manager's background thread (never on an event loop). A
checkpoint that is a node reference is uploaded *on its owning node*, through
``client.run``, so that its bytes go from that node's disk straight to storage and
never through the driver; anything else is uploaded from this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dckpt import storage
from dckpt.checkpoint import Checkpoint
from dckpt.errors import CheckpointNotFoundError, CheckpointUnavailableError

if TYPE_CHECKING:
    from distributed import Client

    from dckpt.cluster._core import NodeRef

logger = logging.getLogger(__name__)


def node_ref_of(checkpoint: Checkpoint) -> NodeRef | None:
    """The node reference ``checkpoint`` is, or was before it was used in this process."""
    kind, value = checkpoint.get_internal_representation()
    if kind == "node_ref":
        ref: NodeRef = value
        return ref
    return checkpoint._resolved_from


def persist(
    checkpoint: Checkpoint,
    uri: str,
    storage_options: Mapping[str, Any] | None,
    client: Client | None,
) -> Checkpoint:
    """Upload ``checkpoint`` to ``uri`` (atomically: commit marker last).

    Returns the checkpoint to track from now on: ``checkpoint`` itself, or for a node
    reference a copy whose reference also carries ``uri``, so that it can still be
    had from storage once its node is gone. A failed upload leaves nothing at ``uri``.

    Raises
    ------
    CheckpointUnavailableError
        The worker that owns a node reference is gone.
    """
    options = dict(storage_options or {})
    ref = node_ref_of(checkpoint)
    try:
        if ref is None:
            checkpoint.to_uri(uri, storage_options=options)
            return checkpoint
        # A fresh object with only the reference: never the driver's copy of the data.
        remote = checkpoint._with_node_ref(ref)
        done = _client(client).run(_upload_on_worker, remote, uri, options,
                                   workers=[ref.store_address], on_error="return")
        reply = done.get(ref.store_address)
        if ref.store_address not in done or isinstance(reply, BaseException):
            raise CheckpointUnavailableError(
                f"cannot persist {checkpoint!r} to {uri}: the worker that holds it "
                f"({ref.store_address}, node {ref.node_id}) did not do it: {reply!r}"
            ) from (reply if isinstance(reply, BaseException) else None)
        return checkpoint._with_node_ref(dataclasses.replace(ref, uris=(*ref.uris, uri)))
    except BaseException:
        with contextlib.suppress(Exception):  # what a failed upload left half-written
            storage.delete(uri, storage_options=options)
        raise


async def _upload_on_worker(
    checkpoint: Checkpoint, uri: str, storage_options: dict[str, Any]
) -> None:
    """On the owner's worker (event loop, through ``client.run``): upload in a thread."""
    await asyncio.to_thread(checkpoint.to_uri, uri, storage_options=storage_options)


def delete(
    ref: NodeRef | None,
    uri: str | None,
    storage_options: Mapping[str, Any] | None,
    client: Client | None,
) -> None:
    """Delete a checkpoint that is no longer kept.

    ``ref``: its directory on the owning node and every node's cached copy
    (:func:`dckpt.cluster._forget.forget`). ``uri``: its persisted copy. A checkpoint
    that is only a local directory or a dict in this process is the caller's and is
    not touched here.
    """
    if ref is not None:
        from dckpt.cluster._forget import forget

        forget(ref, _client(client))
    if uri is not None:
        try:
            storage.delete(uri, storage_options=storage_options)
        except CheckpointNotFoundError:
            logger.debug("nothing to delete at %s", uri)


def _client(client: Client | None) -> Client:
    """``client``, else the default Dask client (a node reference implies a cluster)."""
    if client is not None:
        return client
    from distributed import default_client

    return default_client()
