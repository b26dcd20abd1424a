"""The registry's view of transfers, from snapshots handed to its handler directly:
each node's rate from successive byte counters, transfers in progress, pins."""

from __future__ import annotations

import time
import types
from typing import Any

import pytest

from dckpt.cluster import DckptSchedulerPlugin

MiB = 1 << 20


def _holdings(sent: int, received: int, **extra: Any) -> dict[str, Any]:
    return {"origin": {}, "cached": {}, "stats": {"bytes_sent": sent, "bytes_received": received},
            **extra}


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> tuple[DckptSchedulerPlugin, list[float]]:
    plugin = DckptSchedulerPlugin()
    # The scheduler's list of workers is all the handler looks at.
    workers = {"tcp://a": None, "tcp://b": None}
    plugin._scheduler = types.SimpleNamespace(workers=workers)  # type: ignore[assignment]
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    return plugin, clock


def test_rates_spread_each_change_over_one_interval_and_read_zero_between(plugin):
    registry, clock = plugin
    for t, sent in ((1000.0, 0), (1001.0, 4 * MiB), (1002.0, 6 * MiB), (1012.0, 6 * MiB),
                    (1020.0, 8 * MiB)):
        clock[0] = t
        registry.dckpt_holdings("tcp://a", "node-0", _holdings(sent, 0))
    clock[0] = 1030.0
    series = registry.rates(seconds=300)["node-0"]
    points = list(zip(series["time"], series["sent"]))
    assert points == [
        (1001.0, 4 * MiB), (1002.0, 2 * MiB),      # 1 s apart: the change over that second
        (1003.0, 0.0), (1011.0, 0.0), (1012.0, 0.0),  # quiet: flat at zero
        (1013.0, 0.0), (1019.0, 0.0), (1020.0, 2 * MiB),  # the change in the last second
        (1021.0, 0.0), (1030.0, 0.0),              # and quiet since
    ]
    assert set(series["received"]) == {0.0}


def test_bytes_of_a_receive_in_progress_count_as_received(plugin):
    registry, clock = plugin
    fetching = [{"checkpoint_id": "c1", "source": "the store of node node-0 at tcp://a",
                 "done": 3 * MiB, "total": 8 * MiB}]
    registry.dckpt_holdings("tcp://b", "node-1", _holdings(0, 0))
    clock[0] += 1
    registry.dckpt_holdings("tcp://b", "node-1", _holdings(0, 0, fetching=fetching,
                                                          pinned=["c0"]))
    clock[0] += 1  # done: the counter has it now, and the receive is gone
    assert registry.transfers() == [{"checkpoint_id": "c1", "to_node": "node-1",
                                     "to_address": "tcp://b", "source": fetching[0]["source"],
                                     "done": 3 * MiB, "total": 8 * MiB}]
    [node_1] = [n for n in registry.nodes() if n["address"] == "tcp://b"]
    assert node_1["pinned"] == ["c0"] and node_1["fetching"] == fetching
    registry.dckpt_holdings("tcp://b", "node-1", _holdings(0, 8 * MiB))
    assert registry.rates()["node-1"]["received"] == [3 * MiB, 5 * MiB]
    assert registry.transfers() == []


def test_two_workers_of_one_node_are_two_lines(plugin):
    registry, clock = plugin
    for address in ("tcp://a", "tcp://b"):
        registry.dckpt_holdings(address, "node-0", _holdings(0, 0))
    assert sorted(registry.rates()) == ["node-0 at tcp://a", "node-0 at tcp://b"]
