"""Persisting one checkpoint to a URI, and deleting one wherever it lives.

Both run in the checkpoint manager's background thread (never on an event loop), in
the driver. Where a node reference's bytes are written from depends on who can see
the URI (:func:`uploads_from_node`):

- storage every node reaches (any remote fsspec URI such as ``s3://``, or a local
  path under ``dckpt.shared-paths``): uploaded *on its owning node*, through
  ``client.run``, so that the bytes go from that node's disk straight to storage and
  never through the driver;
- a local path that is not shared (the default ``storage_uri`` among them), or
  ``memory://``: that is the *driver's* disk (or memory), which other machines do not
  see, so the driver fetches the reference (:meth:`Checkpoint.to_uri` resolves it
  here, from the node that holds it) and writes it.

Anything that is not a node reference is written from this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import fsspec.core

from dckpt import _node, _storage
from dckpt._checkpoint import Checkpoint, node_ref_of, with_node_ref
from dckpt.errors import CheckpointNotFoundError, CheckpointUnavailableError

if TYPE_CHECKING:
    from distributed import Client

    from dckpt.cluster import NodeRef

logger = logging.getLogger(__name__)


def uploads_from_node(uri: str) -> bool:
    """Whether a node reference is persisted to ``uri`` from its own node.

    True for storage every node reaches: a remote fsspec URI, or a local path (plain or
    ``file://``) under ``dckpt.shared-paths`` (as configured in the driver). False for
    a local path that is not shared and for ``memory://``: only the driver's process
    sees those, so the driver writes them.
    """
    if _storage.is_local_uri(uri):
        return _node.is_shared_path(_storage.local_path_of(uri))
    return fsspec.core.split_protocol(uri)[0] != "memory"


def persist(
    checkpoint: Checkpoint,
    uri: str,
    storage_options: Mapping[str, Any] | None,
    client: Client | None,
) -> Checkpoint:
    """Upload ``checkpoint`` to ``uri`` (atomically: commit marker last).

    A node reference is uploaded from its own node when :func:`uploads_from_node`,
    else fetched by this process (the driver) and written here. Returns the checkpoint
    to track from now on: ``checkpoint`` itself, or for a node reference a copy whose
    reference also carries ``uri``, so that it can still be had from storage once its
    node is gone. A failed upload leaves nothing at ``uri``.

    Raises
    ------
    CheckpointUnavailableError
        The worker that owns a node reference is gone (and no other source has it).
    """
    options = dict(storage_options or {})
    ref = node_ref_of(checkpoint)
    try:
        if ref is None:
            checkpoint.to_uri(uri, storage_options=options)
            return checkpoint
        # A fresh object with only the reference: never the driver's copy of the data.
        remote = with_node_ref(checkpoint, ref)
        if uploads_from_node(uri):
            _upload_on_node(remote, ref, uri, options, _client(client))
        else:
            _write_here(remote, ref, uri, options, _client(client))
        uris = tuple(dict.fromkeys((*ref.uris, uri)))  # persisted there again: once
        return with_node_ref(checkpoint, dataclasses.replace(ref, uris=uris))
    except BaseException:
        with contextlib.suppress(Exception):  # what a failed upload left half-written
            _storage.delete(uri, storage_options=options)
        raise


def _upload_on_node(
    remote: Checkpoint, ref: NodeRef, uri: str, options: dict[str, Any], client: Client
) -> None:
    done = client.run(_upload_on_worker, remote, uri, options,
                      workers=[ref.store_address], on_error="return")
    reply = done.get(ref.store_address)
    if ref.store_address not in done or isinstance(reply, BaseException):
        raise CheckpointUnavailableError(
            f"cannot persist {remote!r} to {uri}: the worker that holds it "
            f"({ref.store_address}, node {ref.node_id}) did not do it: {reply!r}"
        ) from (reply if isinstance(reply, BaseException) else None)


def _write_here(
    remote: Checkpoint, ref: NodeRef, uri: str, options: dict[str, Any], client: Client
) -> None:
    """Fetch ``remote`` into this process and write it to ``uri``.

    The reference is resolved here as any use of it would be (the same node's path, a
    shared path, else a copy streamed from a holder or downloaded from a URI), with
    ``client`` as the current client so that a client that is not the default one
    works too (this runs in the manager's thread).
    """
    with client.as_current():
        remote.to_uri(uri, storage_options=options)
    # Resolving a reference from another node left a copy in the driver's cache
    # (dckpt.cluster._store.driver_store): the persisted copy is this machine's copy
    # now, so do not keep every checkpoint of the run twice. Paths used in place (the
    # origin's own directory, a shared path) are not in that cache and stay.
    from dckpt.cluster._store import driver_store

    driver_store().evict(ref.checkpoint_id)


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
            _storage.delete(uri, storage_options=storage_options)
        except CheckpointNotFoundError:
            logger.debug("nothing to delete at %s", uri)


def _client(client: Client | None) -> Client:
    """``client``, else the default Dask client (a node reference implies a cluster)."""
    if client is not None:
        return client
    from distributed import default_client

    return default_client()
