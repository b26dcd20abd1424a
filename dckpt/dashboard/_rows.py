"""What the checkpoints page shows, as plain columns: no bokeh here, testable alone.

Everything comes from the scheduler's registry (:class:`~dckpt.cluster.DckptSchedulerPlugin`:
``dckpt_checkpoints``, :meth:`~dckpt.cluster.DckptSchedulerPlugin.nodes`,
:meth:`~dckpt.cluster.DckptSchedulerPlugin.transfers`), which holds each worker's last
snapshot in memory: building a page of rows reads no disk and calls no worker.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from dask.utils import format_bytes

__all__ = ["checkpoint_page", "checkpoint_rows", "html_table", "node_columns", "page_of",
           "transfer_columns"]

Columns = dict[str, list[Any]]


def checkpoint_rows(
    checkpoints: Mapping[str, Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]],
    filter_text: str = "", ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per checkpoint id, sorted by id, keeping those that ``filter_text``
    (case-insensitive) is part of: id, size, holders per node, fetching, URIs.

    ``holders`` reads ``node-0: origin, node-1: cached (pinned)``: ``origin`` serves
    the directory it was made from, ``restarted`` is an origin a restarted worker
    serves again, ``cached`` a copy in that node's cache, ``pinned`` one in use now.
    ``fetching`` lists the nodes receiving it now, with how far each is. ``ids``:
    only those, in that order.
    """
    pinned = {(n["address"], cid) for n in nodes for cid in n.get("pinned", ())}
    fetching: dict[str, list[str]] = {}
    for node in nodes:
        for f in node.get("fetching", ()):
            fetching.setdefault(str(f["checkpoint_id"]), []).append(
                f"{node['node_id']} {_percent(f['done'], f['total'])}")
    rows = []
    needle = filter_text.strip().lower()
    for cid in sorted(set(checkpoints) | set(fetching)) if ids is None else ids:
        entry = checkpoints.get(cid, {})
        holders = ", ".join(
            f"{h['node_id']}: {h['kind']}"
            + (" (pinned)" if (h["address"], cid) in pinned else "")
            for h in sorted(entry.get("holders", ()), key=lambda h: (h["node_id"], h["address"]))
        )
        row = {
            "checkpoint_id": cid,
            "size": format_bytes(int(entry["size"])) if "size" in entry else "",
            "holders": holders,
            "fetching": ", ".join(fetching.get(cid, ())),
            "uris": ", ".join(entry.get("uris", ())),
        }
        if needle and not any(needle in str(value).lower() for value in row.values()):
            continue
        rows.append(row)
    return rows


def page_of(rows: Sequence[Any], page: int, size: int) -> tuple[list[Any], int, int]:
    """Page ``page`` (from 0, clamped) of ``rows``, the page and the pages."""
    pages = max(1, -(-len(rows) // size))
    page = min(max(page, 0), pages - 1)
    return list(rows[page * size:(page + 1) * size]), page, pages


def checkpoint_page(
    checkpoints: Mapping[str, Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]],
    filter_text: str, page: int, size: int,
) -> tuple[Columns, int, int, int]:
    """One page of :func:`checkpoint_rows` as columns, the page, the pages and how many
    rows there are in all.

    Without a filter only the page's rows are built: a thousand checkpoints held by
    fifty nodes each cost a sort of their ids, not fifty thousand holder strings.
    """
    if filter_text.strip():
        rows = checkpoint_rows(checkpoints, nodes, filter_text)
        shown, page, pages = page_of(rows, page, size)
        count = len(rows)
    else:
        fetched = {str(f["checkpoint_id"]) for n in nodes for f in n.get("fetching", ())}
        ids = sorted(set(checkpoints) | fetched)
        chosen, page, pages = page_of(ids, page, size)
        shown, count = checkpoint_rows(checkpoints, nodes, ids=chosen), len(ids)
    return _columns(shown, _CHECKPOINT_KEYS), page, pages, count


_CHECKPOINT_KEYS = ("checkpoint_id", "size", "holders", "fetching", "uris")


def node_columns(nodes: Sequence[Mapping[str, Any]]) -> Columns:
    """One row per worker: cache use against its budget, bytes sent and received,
    transfers, hits and misses, pulls it serves now, and the snapshot's age."""
    rows = []
    for node in nodes:
        stats = node.get("stats") or {}
        cache = stats.get("cache") or {}
        used, budget = int(cache.get("bytes_cached", 0)), int(cache.get("max_bytes", 0))
        rows.append({
            "node_id": node["node_id"] or "(not reported yet)",
            "address": node["address"],
            "origin": _count_and_bytes(node.get("origin", {})),
            "cache": (f"{format_bytes(used)} of {format_bytes(budget)} "
                      f"({_percent(used, budget)})") if budget else "",
            "cache_fraction": used / budget if budget else 0.0,
            "entries": int(cache.get("entries", 0)),
            "pinned": int(cache.get("pinned", 0)),
            "sent": format_bytes(int(stats.get("bytes_sent", 0))),
            "received": format_bytes(int(stats.get("bytes_received", 0))),
            "transfers": int(stats.get("transfers", 0)),
            "hits": int(stats.get("cache_hits", 0)),
            "misses": int(stats.get("cache_misses", 0)),
            "serving": int(node.get("serving", 0)),
            "age": "" if node["age"] is None else f"{node['age']:.1f} s",
        })
    return _columns(rows, _NODE_KEYS)


_NODE_KEYS = ("node_id", "address", "origin", "cache", "cache_fraction", "entries", "pinned",
              "sent", "received", "transfers", "hits", "misses", "serving", "age")


def transfer_columns(
    transfers: Sequence[Mapping[str, Any]], rates: Mapping[tuple[str, str], float],
) -> Columns:
    """One row per receive in progress: checkpoint, to, from, bytes done of total,
    and its rate (``rates``, by ``(to_address, checkpoint_id)``, bytes per second)."""
    rows = []
    for t in transfers:
        rate = rates.get((t["to_address"], t["checkpoint_id"]))
        rows.append({
            "checkpoint_id": t["checkpoint_id"],
            "to": f"{t['to_node']} ({t['to_address']})",
            "source": t["source"],
            "progress": (f"{format_bytes(t['done'])} of {format_bytes(t['total'])} "
                         f"({_percent(t['done'], t['total'])})"),
            "rate": "" if rate is None else f"{format_bytes(int(rate))}/s",
        })
    return _columns(rows, ("checkpoint_id", "to", "source", "progress", "rate"))


def html_table(columns: Columns, headers: Sequence[tuple[str, str]], name: str) -> str:
    """``columns`` as an HTML table of the ``(key, title)`` pairs of ``headers``,
    every value escaped; ``name`` is its CSS class (``dckpt-<name>``)."""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in headers)
    length = len(columns[headers[0][0]]) if headers else 0
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(columns[key][i]))}</td>" for key, _ in headers)
        + "</tr>"
        for i in range(length)
    )
    return (f'<table class="dckpt-{name}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _columns(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Columns:
    return {key: [row[key] for row in rows] for key in keys}


def _percent(done: int, total: int) -> str:
    return f"{100 * done // total}%" if total else "100%"


def _count_and_bytes(held: Mapping[str, int]) -> str:
    return f"{len(held)} ({format_bytes(sum(held.values()))})"
