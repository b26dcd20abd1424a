"""``dckpt ls --scheduler ADDR``: what each node of a running cluster holds.

From the scheduler's registry (:func:`dckpt.cluster.registry`: the checkpoints each
worker serves, ``origin``, and the copies in its node cache, ``cached``) and every
store's counters (:func:`dckpt.cluster.stats`). The registry lags the workers by about
``dckpt.registry.interval``.
"""

from __future__ import annotations

import argparse
from typing import Any

from dckpt.cli import _output

NAME = "ls"
SUMMARY = "list the checkpoints each node of a running cluster holds"
DESCRIPTION = """\
Show what each node of a running Dask cluster holds: the checkpoints it serves
(origin) and the copies in its cache (cached), with their sizes, the pinned cache
entries, and each node store's counters (bytes sent and received, transfers, cache
hits and misses). The cluster needs dckpt set up: dckpt.cluster.install(client), the
scheduler preload, or `dckpt cluster`.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``ls``."""
    parser.add_argument("--scheduler", required=True, metavar="ADDR",
                        help="the scheduler's address, e.g. tcp://127.0.0.1:8786")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to try to connect (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")


def run(args: argparse.Namespace) -> int:
    report = collect(args.scheduler, args.timeout)
    if args.json:
        _output.print_json(report)
    else:
        print(render(report))
    return 0


def collect(address: str, timeout: float) -> dict[str, Any]:
    """``{"scheduler": address, "workers": {worker address: {...}}}``.

    Per worker: ``node_id``, ``age`` (seconds since its last snapshot), ``origin``
    and ``cached`` (``{checkpoint id: bytes}``) and ``stats`` (its store's counters).
    """
    from distributed import Client  # the other subcommands do without distributed

    from dckpt.cluster import registry, stats

    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, ValueError) as e:
        raise _output.CommandError(f"cannot reach a Dask scheduler at {address}: {e}") from e
    with client:
        holdings = registry(client)
        counters = stats(client)
        workers = {
            worker: {**held, "stats": counters.get(worker)}
            for worker, held in holdings.items()
        }
        return {"scheduler": client.scheduler.address, "workers": workers}


def render(report: dict[str, Any]) -> str:
    """Two tables: the workers with their counters, then the checkpoints by node."""
    workers = report["workers"]
    rows = []
    held = []
    for address, worker in sorted(workers.items(),
                                  key=lambda item: (item[1]["node_id"] or "", item[0])):
        st = worker["stats"] or {}
        node = worker["node_id"] or st.get("node_id") or "?"
        rows.append([
            node, address,
            _count_and_size(worker["origin"]), _count_and_size(worker["cached"]),
            st.get("cache", {}).get("pinned", "?"),
            _output.size(st.get("bytes_sent")), _output.size(st.get("bytes_received")),
            st.get("transfers", "?"), st.get("cache_hits", "?"), st.get("cache_misses", "?"),
        ])
        for kind in ("origin", "cached"):
            for checkpoint_id, size in worker[kind].items():
                held.append([checkpoint_id, node, kind, _output.size(size)])
    lines = [
        f"scheduler {report['scheduler']}: {len(workers)} workers",
        "",
        _output.table(["NODE", "WORKER", "ORIGIN", "CACHED", "PINNED", "SENT", "RECEIVED",
                       "TRANSFERS", "HITS", "MISSES"], rows),
        "",
    ]
    if held:
        lines.append(_output.table(["CHECKPOINT", "NODE", "HELD AS", "BYTES"], sorted(held)))
    else:
        lines.append("no checkpoints held")
    return "\n".join(lines)


def _count_and_size(checkpoints: dict[str, int]) -> str:
    return f"{len(checkpoints)} ({_output.size(sum(checkpoints.values()))})"
