"""Which holders of a checkpoint to ask, in which order (step 4 of resolution).

The scheduler's registry (``dckpt_holders``, :mod:`dckpt.cluster._scheduler_plugin`)
names the nodes that hold a complete copy of a checkpoint and how many transfers each
is serving; :func:`order_holders` turns its answer into the stores to try.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dckpt.cluster._core import NodeRef

__all__ = ["BUSY_SERVING", "Holder", "order_holders"]


#: A holder sending this many transfers at once counts as busy: the origin is asked
#: before it (the registry's count lags by about ``dckpt.registry.interval``).
BUSY_SERVING = 4


@dataclasses.dataclass(frozen=True)
class Holder:
    """A store that the registry says holds a checkpoint (or the reference's own)."""

    address: str
    node_id: str
    kind: str  # "origin", "cached", or "fetching" (receiving it now: a broadcast's link)
    serving: int = 0

    def describe(self) -> str:
        return f"{self.kind} holder: store of {self.node_id} at {self.address}"


def order_holders(
    answer: Mapping[str, Any] | None, ref: NodeRef, here: str
) -> tuple[list[Holder], list[str]]:
    """The holders to try, in order, and notes for the error message (step 4).

    ``answer`` is the registry's (``dckpt_holders``), or None without a registry: then
    the reference's own store address is all there is. Holders on this node are left
    out (its cache was looked at, its origin path too). A holder the registry names as
    *fetching* comes first: it is receiving the checkpoint now and serves it on as it
    arrives, which makes simultaneous readers a chain (:mod:`dckpt.cluster._broadcast`).
    Then holders on other nodes that serve fewer than :data:`BUSY_SERVING` transfers,
    fewest first, then the origin node's workers, then the busy ones. The reference's address is tried while
    the scheduler knows that worker (the registry's snapshots may lag behind a
    reference made a moment ago); once it is gone, the origin node is reached through
    the workers the registry lists for it now.
    """
    origin = Holder(ref.store_address, ref.node_id, "origin")
    if answer is None:
        return ([origin] if ref.node_id != here else []), []
    relays: list[Holder] = []
    others: list[Holder] = []
    origins: list[Holder] = []
    for item in answer.get("holders", ()):
        holder = Holder(str(item["address"]), str(item["node_id"]), str(item["kind"]),
                        int(item.get("serving", 0)))
        if holder.node_id == here or any(h.address == holder.address for h in relays):
            continue
        if holder.kind == "fetching":
            relays.append(holder)
            continue
        (origins if holder.node_id == ref.node_id else others).append(holder)
    notes: list[str] = []
    if ref.node_id != here:
        if answer.get("address_alive"):
            if all(h.address != ref.store_address for h in origins):
                origins.insert(0, origin)
        elif not origins:
            current = list(answer.get("node_addresses", ()))
            notes.append(
                f"store of {ref.node_id} at {ref.store_address}: that worker is gone, and "
                + (f"the workers {ref.node_id} has now ({', '.join(current)}) do not hold it"
                   if current else f"no worker of {ref.node_id} is in the registry")
            )
    others.sort(key=lambda h: (h.serving, h.kind != "cached", h.address))
    idle = [h for h in others if h.serving < BUSY_SERVING]
    busy = [h for h in others if h.serving >= BUSY_SERVING]
    return relays + idle + origins + busy, notes
