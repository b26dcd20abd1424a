"""The directories a node store serves, and their index on the node's disk.

A store serves only directories registered with it by code on its own worker
(:func:`dckpt.cluster._store.register_directory`); each is served under its checkpoint
id, which is its content's (:attr:`dckpt._transfer.Manifest.content_id`). So that a
registration outlives the worker process, every one is also written to an index on
the node's disk, ``<node root>/served/index.json``: a restarted worker of the node
(a nanny's restart, a crash and a new ``dask worker``) reads it at start
(:meth:`ServedDirectories.restore`) and serves again every directory that is still
there with the same content; those are marked ``restored``. Entries whose directory is
gone or changed are dropped from the index.

The index is shared by every worker process of the node (``--nworkers N``): each
change is a read-modify-write under an ``flock`` on ``served/.lock``, and the file is
replaced by a rename, so a reader never sees half of it. A worker restores every
entry, whoever registered it: any worker of the node can read the node's disk. An
index that cannot be read is logged and started afresh (the directories themselves
are never touched by it).

Threads: every method may be called from any thread; those that touch the index or
build a manifest do disk I/O (and :meth:`restore` reads every file it restores, to hash
it), so event-loop code calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from dckpt import _transfer
from dckpt._formats import atomic_file
from dckpt._locks import flocked
from dckpt.cluster._cache_index import CheckpointId
from dckpt.errors import CheckpointNotFoundError

__all__ = ["Registration", "ServedDirectories"]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
_LOCK_NAME = ".lock"
_INDEX_VERSION = 1


@dataclass(frozen=True)
class Registration:
    """A directory this node serves: its id (of its content), path, manifest, the URIs
    it is known to be persisted at, and whether a restarted worker restored it."""

    checkpoint_id: CheckpointId
    path: str
    manifest: _transfer.Manifest
    uris: tuple[str, ...] = ()
    restored: bool = field(default=False, compare=False)


class ServedDirectories:
    """The directories a store may serve, kept in memory and in an index on disk.

    Parameters
    ----------
    root
        The folder of the index (created if needed), or ``None`` for no index (a
        store whose registrations die with it).
    """

    root: str | None
    _by_id: dict[CheckpointId, Registration]
    _lock: threading.Lock

    def __init__(self, root: str | None) -> None:
        self.root = root
        self._by_id = {}
        self._lock = threading.Lock()
        if root is not None:
            os.makedirs(root, exist_ok=True)

    # -- registering ----------------------------------------------------------------

    def add(
        self, path: str, uris: tuple[str, ...] = (), manifest: _transfer.Manifest | None = None
    ) -> Registration:
        """Serve the directory ``path`` under the id of its content; its registration.

        ``manifest`` is the directory's if the caller has it (a copy just received);
        else it is built, which hashes the files not hashed before
        (:func:`dckpt._transfer.build_manifest`). A directory registered again with other
        content is served under its new id only; the URIs of an earlier registration
        of the same content are kept.
        """
        path = os.path.realpath(path)
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"cannot serve {path}: not a directory")
        if manifest is None:
            manifest = _transfer.build_manifest(path)
        checkpoint_id = CheckpointId(manifest.content_id)
        with self._lock:
            old = self._by_id.get(checkpoint_id)
            known = old.uris if old is not None and old.path == path else ()
            registration = Registration(checkpoint_id, path, manifest,
                                        tuple(dict.fromkeys((*known, *uris))))
            stale = [cid for cid, r in self._by_id.items()
                     if r.path == path and cid != checkpoint_id]
            for cid in stale:
                del self._by_id[cid]
            self._by_id[checkpoint_id] = registration
        if registration != old or stale:  # pickling the same directory again writes nothing
            self._update_index(put=registration, drop=stale)
        return registration

    def get(self, checkpoint_id: CheckpointId) -> Registration:
        """The registration of ``checkpoint_id``.

        Raises
        ------
        CheckpointNotFoundError
            If it was registered but its directory is gone (removed by its owner, or a
            pushed copy the cache evicted); the registration goes too.
        PermissionError
            If it is not registered here: a store serves nothing else.
        """
        with self._lock:
            registration = self._by_id.get(checkpoint_id)
        if registration is not None and not os.path.isdir(registration.path):
            self._forget_gone(registration)
            raise CheckpointNotFoundError(
                f"checkpoint {checkpoint_id!r} was at {registration.path}, which is gone"
            )
        if registration is None:
            raise PermissionError(
                f"checkpoint {checkpoint_id!r} is not registered with this node's store; "
                "a store serves only directories registered on its own node"
            )
        return registration

    def find(self, checkpoint_id: CheckpointId) -> Registration | None:
        """The registration of ``checkpoint_id`` if its directory is there, else None."""
        with self._lock:
            registration = self._by_id.get(checkpoint_id)
        if registration is not None and not os.path.isdir(registration.path):
            self._forget_gone(registration)
            return None
        return registration

    def _forget_gone(self, registration: Registration) -> None:
        with self._lock:
            if self._by_id.get(registration.checkpoint_id) is registration:
                del self._by_id[registration.checkpoint_id]
        self._update_index(drop=[registration.checkpoint_id])

    def remove(self, checkpoint_id: CheckpointId) -> Registration | None:
        """Stop serving ``checkpoint_id`` (here and in the index); its registration, if any.

        The directory itself is left alone: whoever removes the registration decides.
        """
        with self._lock:
            registration = self._by_id.pop(checkpoint_id, None)
        self._update_index(drop=[checkpoint_id])
        return registration

    def ids(self) -> list[CheckpointId]:
        with self._lock:
            return list(self._by_id)

    def all(self) -> list[Registration]:
        with self._lock:
            return list(self._by_id.values())

    def sizes(self) -> dict[CheckpointId, int]:
        with self._lock:
            return {cid: r.manifest.total_bytes for cid, r in self._by_id.items()}

    # -- the index on disk ----------------------------------------------------------

    def restore(self) -> list[Registration]:
        """Serve again what the node's index lists and is still there, unchanged.

        Called once when a store starts. An entry whose directory is gone, or whose
        content is no longer that of its id, is dropped from the index (logged).
        Returns the registrations restored.
        """
        if self.root is None:
            return []
        with flocked(self._lock_path):
            entries = self._read_locked()
        restored: list[Registration] = []
        dropped: list[CheckpointId] = []
        for cid, entry in entries.items():
            path = entry["path"]
            try:
                manifest = _transfer.build_manifest(path) if os.path.isdir(path) else None
            except OSError as e:
                logger.info("not serving %s again: %s", path, e)
                manifest = None
            if manifest is None or manifest.content_id != cid:
                logger.info("not serving checkpoint %s again: %s is %s", cid, path,
                            "gone" if manifest is None else "changed")
                dropped.append(CheckpointId(cid))
                continue
            registration = Registration(CheckpointId(cid), path, manifest,
                                        tuple(entry["uris"]), restored=True)
            with self._lock:
                self._by_id.setdefault(registration.checkpoint_id, registration)
            restored.append(registration)
        if dropped:
            self._update_index(drop=dropped)
        if restored:
            logger.info("serving %d checkpoints again after a restart", len(restored))
        return restored

    @property
    def _lock_path(self) -> str:
        assert self.root is not None
        return os.path.join(self.root, _LOCK_NAME)

    def _update_index(
        self, put: Registration | None = None, drop: list[CheckpointId] | None = None
    ) -> None:
        if self.root is None:
            return
        try:
            with flocked(self._lock_path):
                entries = self._read_locked()
                for cid in drop or ():
                    entries.pop(cid, None)
                if put is not None:
                    entries[put.checkpoint_id] = {"path": put.path, "uris": list(put.uris)}
                self._write_locked(entries)
        except OSError as e:
            # Serving works on; only a restarted worker would not serve it again.
            logger.warning("could not update the index of served checkpoints in %s: %s",
                           self.root, e)

    def _read_locked(self) -> dict[str, dict[str, Any]]:
        assert self.root is not None
        path = os.path.join(self.root, INDEX_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if doc.get("version") != _INDEX_VERSION:
                raise ValueError(f"version {doc.get('version')!r}, not {_INDEX_VERSION}")
            entries = {
                str(cid): {"path": str(e["path"]), "uris": [str(u) for u in e["uris"]]}
                for cid, e in doc["entries"].items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            logger.warning("the index of served checkpoints %s is unusable (%s); starting "
                           "it afresh", path, e)
            return {}
        return entries

    def _write_locked(self, entries: dict[str, dict[str, Any]]) -> None:
        assert self.root is not None
        with atomic_file(os.path.join(self.root, INDEX_NAME), "w") as f:
            json.dump({"version": _INDEX_VERSION, "entries": entries}, f)

