"""Node identity: who this process is, which paths every node sees, where its data goes.

A *node* is a machine, or something that behaves like one: its processes share one
disk and nothing else. A checkpoint directory written on a node can be used as it is by
any process of the same node, by any process at all when it lies under a shared path,
and otherwise has to be copied. This module answers the three questions that decision
needs, from settings alone; it knows nothing about Dask clusters.

Settings (read at the point of use, so ``dask.config.set`` works in tests and
``DASK_DCKPT__NODE_ID=node-1`` works in a worker's environment):

``dckpt.node-id``
    This process's node id; null means the host name.
``dckpt.shared-paths``
    Absolute paths that every node sees with the same contents (NFS, a cluster file
    system). A single string is taken as one path.
``dckpt.node-root``
    The node-local folder under which dckpt keeps its files (the node cache); null
    means ``<dckpt temporary directory>/dckpt-<node id>``.
"""

from __future__ import annotations

import os
import re
import socket

import dask.config

from dckpt import _config

__all__ = ["cache_directory", "is_shared_path", "node_id", "node_root", "shared_paths"]


def node_id() -> str:
    """This process's node id.

    Returns
    -------
    str
        ``dckpt.node-id`` when set, else the host name (``socket.gethostname()``).
        Processes with the same node id are assumed to share one local disk.

    Examples
    --------
    >>> with dask.config.set({"dckpt.node-id": "node-1"}):
    ...     node_id()
    'node-1'
    """
    configured = dask.config.get("dckpt.node-id", None)
    # str(): dask parses environment values as Python literals, so
    # DASK_DCKPT__NODE_ID=7 arrives as the int 7.
    if configured is not None and str(configured) != "":
        return str(configured)
    return socket.gethostname()


def _normalize(path: str) -> str:
    path = os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(path))))
    # POSIX lets normpath keep a leading "//" (it may mean something to the OS); for
    # comparing paths it names the same place as "/".
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path


def shared_paths() -> list[str]:
    """The paths that every node sees with the same contents (``dckpt.shared-paths``).

    Returns
    -------
    list of str
        Normalized absolute paths (``~`` expanded, no trailing separator, no ``..``),
        without duplicates, in the order configured.

    Raises
    ------
    ValueError
        If an entry is a relative path: it would mean a different folder in every
        process, depending on its working directory.
    """
    configured = dask.config.get("dckpt.shared-paths", None) or []
    if isinstance(configured, (str, os.PathLike)):
        configured = [configured]
    paths: list[str] = []
    for entry in configured:
        raw = os.path.expanduser(os.fspath(entry))
        if not os.path.isabs(raw):
            raise ValueError(
                f"dckpt.shared-paths holds the relative path {entry!r}; every entry must "
                "be an absolute path that all nodes see, e.g. '/mnt/shared'"
            )
        path = _normalize(raw)
        if path not in paths:
            paths.append(path)
    return paths


def is_shared_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies under one of the :func:`shared_paths` (or is one).

    Parameters
    ----------
    path
        A path; a relative one is taken relative to this process's working directory.

    Returns
    -------
    bool
        True when a shared path is an ancestor of ``path`` by whole path components:
        ``/data/shared/x`` is under ``/data/shared``, ``/data/shared2`` is not.

    Notes
    -----
    The comparison is lexical: symbolic links are not resolved, because the question
    is asked about a path that was written down on one node and is read on another,
    where the links may point elsewhere or not exist at all.
    """
    candidate = _normalize(os.fspath(path))
    for shared in shared_paths():
        if candidate == shared or os.path.commonpath([candidate, shared]) == shared:
            return True
    return False


def _safe_file_name(name: str) -> str:
    # A node id is free text (a host name, "node-1", ...); keep it to one path component.
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def node_root() -> str:
    """The node-local folder under which dckpt keeps this node's files; created if needed.

    Returns
    -------
    str
        ``dckpt.node-root`` when set, else ``<temporary directory>/dckpt-<node id>``
        (see ``dckpt.temporary-directory``), as an absolute path.
    """
    configured = dask.config.get("dckpt.node-root", None)
    if configured:
        root = _normalize(os.fspath(configured))
    else:
        root = os.path.join(
            _config.temporary_directory(), f"dckpt-{_safe_file_name(node_id())}"
        )
    os.makedirs(root, exist_ok=True)
    return root


def cache_directory() -> str:
    """The folder of this node's checkpoint cache, ``<node root>/cache``; created if needed.

    Returns
    -------
    str
        An absolute path on this node's local disk.
    """
    path = os.path.join(node_root(), "cache")
    os.makedirs(path, exist_ok=True)
    return path
