"""The exceptions dckpt raises.

Each type is chosen by what the caller should do about it, and each also subclasses
the built-in exception a caller already catches (``FileNotFoundError``,
``ValueError``), so code written for Ray AIR or plain Python keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CheckpointFormatError",
    "UnsafePathError",
    "UnsupportedRayClassError",
    "CorruptChunkError",
    "CheckpointURIError",
    "StorageError",
    "IncompatibleCheckpointError",
    "CacheFullError",
    "CheckpointUnavailableError",
    "IsolationUnavailableError",
]


class CheckpointError(Exception):
    """Base class of every error dckpt raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A directory or URI that should hold a checkpoint holds nothing."""


class IncompleteCheckpointError(CheckpointNotFoundError):
    """A URI holds a dckpt upload that never finished (no commit marker).

    A subclass of ``FileNotFoundError``: there is no *complete* checkpoint there, and a
    caller looking for the latest usable checkpoint should move on to an older one.
    """


class CheckpointFormatError(CheckpointError, ValueError):
    """Bytes or files that are not a dckpt checkpoint, or are damaged.

    Raised before anything is unpickled: headers, lengths and checksums are checked
    first.
    """


class UnsafePathError(CheckpointFormatError):
    """An archive or manifest entry would land outside the target directory."""


class UnsupportedRayClassError(CheckpointFormatError):
    """A checkpoint Ray AIR wrote names a class that dckpt does not map.

    Ray's metadata (``.metadata.pkl``) names the checkpoint's class; dckpt reads the
    classes it has a counterpart of (``ray.air.checkpoint.Checkpoint`` and the
    framework checkpoints) and refuses any other before unpickling anything else. Map
    more with ``dckpt.ray.classes`` (``{"ray.module:RayClass": "pkg.module:DckptClass"}``).
    Also raised for a class of Ray in the checkpoint's own data when Ray is not
    installed.
    """


class CorruptChunkError(CheckpointFormatError):
    """A chunk of a directory transfer failed its length or checksum check.

    The receiver fetches such a chunk again (``dckpt.transfer.retries`` times) before
    it gives up with this error; the message names the file and offset.
    """


class CheckpointURIError(CheckpointError, ValueError):
    """A URI whose protocol fsspec does not know, or whose backend is not installed."""


class StorageError(CheckpointError, OSError):
    """The storage back-end at a URI failed: no credentials, no connection, no such
    bucket to write into, access denied, a local disk error, ...

    Raised by :mod:`dckpt._storage` in place of whatever the fsspec back-end raised
    (``botocore``'s ``NoCredentialsError``, ``EndpointConnectionError``, ...), which
    is kept as ``__cause__`` (look there for an ``errno``). The message names the operation and the URI. An ``OSError``, so code
    that catches I/O failures catches it. What means "no checkpoint there" on a read
    is :class:`CheckpointNotFoundError` instead, for a missing bucket as for a missing
    ``memory://`` path.
    """


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """Data saved by one ``Checkpoint`` subclass loaded through an unrelated one."""


class CacheFullError(CheckpointError, OSError):
    """The node cache has no room for a checkpoint, even after evicting what it may.

    What is left is pinned by checkpoints in use, or the checkpoint alone is larger
    than the budget: raise ``dckpt.cache.max-bytes`` (``DASK_DCKPT__CACHE__MAX_BYTES``
    on the workers). An ``OSError``, like the disk-full error it stands in for.
    """


class CheckpointUnavailableError(CheckpointNotFoundError):
    """No step of a node reference's resolution could provide its data.

    The owning node is gone (or unreachable), the path is not shared, this node's cache
    does not hold it, and no URI the reference carries answered. The message lists each
    step tried and why it failed.
    """


class IsolationUnavailableError(CheckpointError, RuntimeError):
    """A :class:`~dckpt.cluster.NodeCluster` was asked for an isolation this machine
    refuses: mount namespaces (``isolate=True``), or network namespaces and ``tc``
    (``network=True``, ``link_rate=``): not Linux, not root, no ``ip``/``tc``, or a
    container without ``CAP_NET_ADMIN``. The message says which and why; pass ``None``
    instead of ``True`` to fall back with a warning.
    """
