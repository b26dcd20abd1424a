"""What travels between processes when a directory checkpoint is pickled on a worker."""

from __future__ import annotations

from dataclasses import dataclass

from dckpt.cluster._cache import CheckpointId
from dckpt.cluster._shared import Fingerprint

__all__ = ["CheckpointId", "NodeRef"]


@dataclass(frozen=True)
class NodeRef:
    """A directory checkpoint on one node: where it is and how to get it.

    A few hundred bytes pickled, whatever the checkpoint's size. Resolved on first use
    (:meth:`dckpt.cluster._store.NodeStore.materialize`): the same node uses ``path``; another node
    copies it into its cache from any holder the scheduler's registry names (the origin
    ``node_id`` at its current worker; ``store_address`` is the one it had when the
    reference was made), or downloads it from one of ``uris``.

    ``checkpoint_id`` is of the content (the first 32 hex digits of ``digest``, the
    sha256 of a manifest with every file's hash), so every copy has it; ``digest`` is
    what a receiver checks the holder's manifest against. ``node_id``, ``path`` and
    ``store_address`` name the origin, also when the reference is pickled again where
    only a copy is.

    ``fingerprint`` lets a node that sees ``path`` on a disk it shares with the origin
    use it in place (:mod:`dckpt.cluster._shared`); None: never.
    """

    node_id: str
    path: str
    checkpoint_id: CheckpointId
    size: int
    digest: str
    store_address: str
    uris: tuple[str, ...] = ()
    fingerprint: Fingerprint | None = None

    def __repr__(self) -> str:
        return (
            f"NodeRef({self.node_id}:{self.path[-60:]}, id={self.checkpoint_id[:12]}, "
            f"{self.size} bytes)"
        )
