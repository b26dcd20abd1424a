"""Pins of the node cache, seen by every process that shares its folder.

A pin keeps a checkpoint from eviction. Each :class:`CachePins` (one per
``NodeCache`` object) counts its own pins in memory; its first pin on a checkpoint
leaves a marker file ``<root>/.pins/{pid}.{token}.{checkpoint key}`` that every
process sees. The marker goes with the last unpin, or when the object is
garbage-collected; a marker whose process is gone is ignored, and removed by the next
:meth:`CachePins.live_keys`, so a crashed worker pins nothing. One flat folder, so that
one listing tells an eviction every pin.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterable

from dckpt._locks import marker_is_alive, new_marker_name
from dckpt.cluster._cache_index import CheckpointId
from dckpt.cluster._cache_names import checkpoint_key

__all__ = ["CachePins"]


class CachePins:
    """The pins of one cache object, and a view of everyone's.

    Not thread-safe: the cache calls it under its thread lock. Taking or releasing a
    pin needs no lock between processes (a marker appears or goes at once); an
    eviction reads :meth:`live_keys` under the folder's lock, so a pin written before
    it is honoured, and a lookup after a pin sees what the eviction did.
    """

    directory: str
    _counts: dict[CheckpointId, int]
    _markers: dict[CheckpointId, str]  # one marker file per checkpoint pinned here

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._counts = {}
        self._markers = {}
        os.makedirs(directory, exist_ok=True)
        # A cache dropped while pinned (a store closed in a live process) lets go.
        weakref.finalize(self, _unlink_all, self._markers.values())

    def count(self, checkpoint_id: CheckpointId) -> int:
        """How many pins this object holds on ``checkpoint_id``."""
        return self._counts.get(checkpoint_id, 0)

    def pin(self, checkpoint_id: CheckpointId) -> None:
        """Add a pin; the first one leaves the marker."""
        count = self.count(checkpoint_id)
        if count == 0:
            os.makedirs(self.directory, exist_ok=True)
            name = new_marker_name(f".{checkpoint_key(checkpoint_id)}")
            marker = os.path.join(self.directory, name)
            open(marker, "x").close()
            self._markers[checkpoint_id] = marker
        self._counts[checkpoint_id] = count + 1

    def unpin(self, checkpoint_id: CheckpointId) -> None:
        """Release a pin; the last one removes the marker.

        Raises
        ------
        ValueError
            If this object holds no pin on ``checkpoint_id``.
        """
        count = self.count(checkpoint_id)
        if count <= 0:
            raise ValueError(
                f"checkpoint {checkpoint_id!r} is not pinned in {os.path.dirname(self.directory)}"
            )
        if count == 1:
            del self._counts[checkpoint_id]
            _unlink_all([self._markers.pop(checkpoint_id)])
        else:
            self._counts[checkpoint_id] = count - 1

    def live_keys(self) -> set[str]:
        """The :func:`checkpoint_key` of every checkpoint a live process pins.

        Removes the markers of processes that are gone.
        """
        keys = {checkpoint_key(checkpoint_id) for checkpoint_id in self._counts}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return keys
        for name in names:
            if marker_is_alive(name):
                keys.add(name.split(".", 2)[-1])
            else:
                _unlink_all([os.path.join(self.directory, name)])
        return keys


def _unlink_all(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
