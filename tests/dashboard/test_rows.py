"""What the page shows, from registry answers made by hand: holders, pins, fetches,
paging and filtering of a thousand checkpoints, escaping."""

from __future__ import annotations

from typing import Any

from dckpt.dashboard._rows import (
    checkpoint_page,
    checkpoint_rows,
    html_table,
    node_columns,
)

A, B = "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"


def _node(address: str, node_id: str, **extra: Any) -> dict[str, Any]:
    return {"address": address, "node_id": node_id, "age": 0.5, "origin": {}, "cached": {},
            "pinned": [], "serving": 0, "stats": {}, "fetching": [], **extra}


def test_holders_say_how_each_node_holds_it_and_who_fetches_it():
    checkpoints = {"c1": {"size": 2048, "uris": ["s3://b/c1"], "holders": [
        {"node_id": "node-1", "address": B, "kind": "cached"},
        {"node_id": "node-0", "address": A, "kind": "origin"}]}}
    nodes = [_node(A, "node-0"), _node(B, "node-1", pinned=["c1"]),
             _node("tcp://127.0.0.1:3", "node-2",
                   fetching=[{"checkpoint_id": "c1", "source": "x", "done": 512, "total": 2048}])]
    [row] = checkpoint_rows(checkpoints, nodes)
    assert row == {"checkpoint_id": "c1", "size": "2.00 kiB",
                   "holders": "node-0: origin, node-1: cached (pinned)",
                   "fetching": "node-2 25%", "uris": "s3://b/c1"}


def test_a_thousand_checkpoints_come_a_page_at_a_time_and_filter():
    checkpoints = {f"c{i:04d}": {"size": i, "uris": [], "holders": [
        {"node_id": f"node-{i % 50}", "address": f"tcp://h:{i % 50}", "kind": "origin"}]}
        for i in range(1000)}
    nodes = [_node(f"tcp://h:{n}", f"node-{n}") for n in range(50)]
    page, number, pages, count = checkpoint_page(checkpoints, nodes, "", 3, 50)
    assert (number, pages, count) == (3, 20, 1000)
    assert page["checkpoint_id"] == [f"c{i:04d}" for i in range(150, 200)]
    assert page["holders"][0] == "node-0: origin"
    assert checkpoint_page(checkpoints, nodes, "", 99, 50)[1] == 19  # past the end: the last
    assert checkpoint_page({}, [], "", 0, 50)[1:] == (0, 1, 0)
    only, number, pages, count = checkpoint_page(checkpoints, nodes, "NODE-49:", 0, 50)
    assert (number, pages, count) == (0, 1, 20)
    assert set(only["holders"]) == {"node-49: origin"}
    assert checkpoint_rows(checkpoints, nodes, "NODE-49:")[0]["checkpoint_id"] == "c0049"


def test_nodes_show_cache_use_against_the_budget():
    stats = {"bytes_sent": 3 << 20, "bytes_received": 0, "transfers": 0, "cache_hits": 2,
             "cache_misses": 1, "cache": {"bytes_cached": 1 << 30, "max_bytes": 4 << 30,
                                          "entries": 3, "pinned": 1}}
    columns = node_columns([_node(A, "node-0", stats=stats, origin={"c1": 10}),
                            _node(B, None, age=None)])
    assert columns["cache"] == ["1.00 GiB of 4.00 GiB (25%)", ""]
    assert columns["sent"][0] == "3.00 MiB" and columns["hits"][0] == 2
    assert columns["origin"][0] == "1 (10 B)"
    assert columns["node_id"][1] == "(not reported yet)"


def test_tables_escape_what_they_show():
    table = html_table({"a": ["<b>&"]}, [("a", "A<")], "t")
    assert "<td>&lt;b&gt;&amp;</td>" in table and "<th>A&lt;</th>" in table
