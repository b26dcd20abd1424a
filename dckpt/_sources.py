"""Where a :class:`~dckpt.Checkpoint`'s data is: one value, four kinds.

A checkpoint holds exactly one :data:`Source`; each kind is a small frozen dataclass,
so "which representation is this" is a ``match`` on one field rather than a question
asked of seven nullable ones. A checkpoint changes source by replacing the value (a
node reference found on this node, a URI it was persisted to), never by editing it.

Every kind knows ``uris``, the URIs it is known to be persisted at, so that a node
reference made from it (when it is pickled on a worker, or staged with
:func:`dckpt.put`) can fall back to them once its node is gone.

Nothing here imports :mod:`distributed` or :mod:`dckpt.cluster`: a
:class:`~dckpt.cluster._core.NodeRef` is held, never built or resolved, in this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dckpt.cluster import NodeRef

__all__ = ["DictData", "LocalDirectory", "NodeReference", "Source", "UriFolder", "with_uri"]


@dataclass(frozen=True, repr=False)
class DictData:
    """An in-memory dict checkpoint.

    ``data`` is the user's dict with the reserved ``"_dckpt"`` key already split off
    (:func:`dckpt._formats._layout.split_reserved`); ``files`` are the files added to
    its directory form, packed (:mod:`dckpt._formats._packing`), or ``None``.
    """

    data: dict[Any, Any]
    files: bytes | None = None
    uris: tuple[str, ...] = ()

    def __repr__(self) -> str:  # bounded whatever the dict holds
        files = "no files" if self.files is None else f"{len(self.files)} bytes of files"
        return f"DictData({{...{len(self.data)} keys}}, {files})"


@dataclass(frozen=True)
class LocalDirectory:
    """A directory on this machine that the checkpoint refers to (and does not own).

    ``path`` is absolute. ``uris``: where this object was persisted with ``to_uri``.
    """

    path: str
    uris: tuple[str, ...] = ()


@dataclass(frozen=True)
class UriFolder:
    """A folder at a URI that fsspec opens (never ``file://``: that is a directory).

    ``storage_options`` go to fsspec and travel with the checkpoint. ``uris``: other
    URIs this object was persisted to with ``to_uri``.
    """

    uri: str
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    uris: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeReference:
    """A directory checkpoint on some node of the cluster, as a :class:`NodeRef`.

    ``path`` is where this process found its data (the origin's directory, a shared
    path, this node's cached copy), or ``None`` until it is first used here. It is a
    path of this node only, so it never travels: a pickled ``NodeReference`` is its
    ``ref`` alone. URIs the checkpoint is persisted to since it was made are merged
    into ``ref.uris`` (:func:`with_uri`), so forwarding the reference carries them.
    """

    ref: NodeRef
    path: str | None = None

    @property
    def uris(self) -> tuple[str, ...]:
        """The URIs the reference can fall back to: ``ref.uris``."""
        return self.ref.uris

    def __reduce__(self) -> tuple[type[NodeReference], tuple[NodeRef]]:
        return NodeReference, (self.ref,)


#: The one field that says where a checkpoint's data is.
Source = DictData | LocalDirectory | UriFolder | NodeReference


def with_uri(source: Source, uri: str) -> Source:
    """``source`` known to be persisted at ``uri`` too (once, in the order persisted)."""
    if isinstance(source, NodeReference):
        ref = dataclasses.replace(source.ref, uris=_added(source.ref.uris, uri))
        return dataclasses.replace(source, ref=ref)
    return dataclasses.replace(source, uris=_added(source.uris, uri))


def _added(uris: tuple[str, ...], uri: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*uris, uri)))
