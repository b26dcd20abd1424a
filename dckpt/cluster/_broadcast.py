"""Who pulls from whom when many nodes want one checkpoint at once (scheduler side).

Every store that misses a checkpoint asks the registry for its holders
(``dckpt_holders``) and says who it is. :class:`Fetchers` records it as *fetching* that
checkpoint and points each later asker at one fetcher that no other reader was sent to
yet — the most recent one — so the readers form a chain: origin → first reader →
second reader → …; each forwards what it receives as it arrives
(:mod:`dckpt.cluster._relay`). The origin sends each byte once, whatever the number of
readers, and every node's link carries the checkpoint once in and once out, so N
readers take about the time of one plus a chunk per hop.

A chain link that fails costs its readers a retry from the next holder (the registry's
other holders follow the fetcher in every answer); a record is dropped once its worker
reports the checkpoint cached, or no longer fetching, or leaves.

Runs on the scheduler's event loop; in-memory only.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from dckpt.cluster._cache import CheckpointId

__all__ = ["Fetchers"]

#: Readers sent to one fetcher: 1 makes a chain (each link's upload carries it once).
DOWNSTREAM_PER_FETCHER = 1


@dataclasses.dataclass
class _Fetch:
    node_id: str
    started: float  # time.monotonic()
    downstream: int = 0


class Fetchers:
    """The workers fetching each checkpoint now, and how many readers each was given."""

    _by_id: dict[CheckpointId, dict[str, _Fetch]]

    def __init__(self) -> None:
        self._by_id = {}

    def ask(
        self, checkpoint_id: CheckpointId, asker: str | None, asker_node: str | None
    ) -> list[dict[str, Any]]:
        """The fetcher ``asker`` should pull from (as a holder of kind ``fetching``),
        if any; then record ``asker`` as fetching ``checkpoint_id``.

        A fetcher on the asker's own node is never named (that node's cache is shared).
        """
        fetches = self._by_id.setdefault(checkpoint_id, {})
        candidates = [
            (fetch.downstream, -fetch.started, address)
            for address, fetch in fetches.items()
            if address != asker and fetch.node_id != asker_node
            and fetch.downstream < DOWNSTREAM_PER_FETCHER
        ]
        answer = []
        if candidates:
            _, _, address = min(candidates)
            chosen = fetches[address]
            chosen.downstream += 1
            answer.append({"address": address, "node_id": chosen.node_id,
                           "kind": "fetching", "serving": chosen.downstream})
        if asker is not None and asker_node is not None:
            fetches[asker] = _Fetch(asker_node, time.monotonic())
        return answer

    def reported(self, address: str, held: set[CheckpointId], fetching: set[CheckpointId],
                 grace: float) -> None:
        """``address`` reported what it holds and fetches: drop what it finished.

        A record younger than ``grace`` seconds stays even if the report does not list
        it: the report may have been taken before the worker asked.
        """
        now = time.monotonic()
        for checkpoint_id in list(self._by_id):
            fetch = self._by_id[checkpoint_id].get(address)
            if fetch is None:
                continue
            if checkpoint_id in held or (checkpoint_id not in fetching
                                         and now - fetch.started > grace):
                self._drop(checkpoint_id, address)

    def forget_worker(self, address: str) -> None:
        """``address`` left the cluster."""
        for checkpoint_id in list(self._by_id):
            self._drop(checkpoint_id, address)

    def _drop(self, checkpoint_id: CheckpointId, address: str) -> None:
        fetches = self._by_id.get(checkpoint_id, {})
        fetches.pop(address, None)
        if not fetches:
            self._by_id.pop(checkpoint_id, None)
