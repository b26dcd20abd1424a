"""Where a directory checkpoint becomes a node reference, and where one is used.

:func:`make_ref` runs when a directory checkpoint is pickled in a worker process: the
worker's store registers the directory (so it may serve it) and the checkpoint travels
as a :class:`~dckpt.cluster._core.NodeRef`. Its id is that of its content
(:attr:`dckpt._transfer.Manifest.content_id`: relative paths, sizes, modes, link
targets and each file's xxh3-128 hash), so copies anywhere have the same id, the same
bytes in two directories are one checkpoint, and a reference pickled again where only
a copy is (``Checkpoint.__getstate__``) keeps the original id, origin and URIs.

:func:`pinned_copy` runs when a process first needs the data: this process's store
(:func:`~dckpt.cluster._store.this_process_store`: the worker's, or the driver's
server-less one) materializes it, in the order of
:meth:`~dckpt.cluster._store.NodeStore.materialize`. This module runs in task threads
(or the driver's), never on the event loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from dckpt import _compat, _node
from dckpt.cluster import _shared
from dckpt.cluster._core import NodeRef
from dckpt.cluster._store import (
    STORE_KEY,
    NodeStore,
    register_directory,
    this_process_store,
)

__all__ = ["make_ref", "pinned_copy"]


def make_ref(path: str, uris: tuple[str, ...] = ()) -> NodeRef | None:
    """Register ``path`` with this worker's store and return a reference to it.

    ``None`` when this process is not a worker with a store (the caller then sends
    the data itself). The checkpoint id is that of the directory's content: pickling
    the same directory again registers it once (and hashes nothing again), and a
    directory written since gets a new id.

    The first pickling hashes every file (about 0.12 s per GiB in the page cache, see
    :mod:`dckpt._transfer._hashes`) in the thread that pickles: for a task's result
    that may be the worker's event loop. A task that returns a checkpoint of many GiB
    can take that off the loop by pickling it once itself (``pickle.dumps(checkpoint)``
    before returning it): the hashes are remembered.
    """
    worker = _compat.process_worker()
    if worker is None or not isinstance(_compat.actor_instance(worker, STORE_KEY), NodeStore):
        return None
    real = os.path.realpath(path)
    registration = register_directory(real, worker, tuple(uris))
    return NodeRef(
        node_id=_node.node_id(),
        path=real,
        checkpoint_id=registration.checkpoint_id,
        size=registration.manifest.total_bytes,
        digest=registration.manifest.digest,
        store_address=worker.address,
        uris=registration.uris,
        fingerprint=_shared.fingerprint(real),
    )


@contextlib.contextmanager
def pinned_copy(
    ref: NodeRef, path: str | None, callback: Callback = DEFAULT_CALLBACK
) -> Iterator[str]:
    """A local directory with the data of ``ref``, kept from eviction for the block.

    ``path`` is where ``ref`` was found before, if anywhere: used again while it
    exists, materialized anew otherwise (:meth:`~dckpt.cluster._store.NodeStore.open`).
    A copy this call makes from another node is reported to ``callback.branched(ref,
    cache)``: ``set_size`` of the whole, then every chunk received.
    """
    with this_process_store().open(ref, path, callback) as found:
        yield found
