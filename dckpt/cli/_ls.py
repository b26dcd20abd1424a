"""``dckpt ls --scheduler ADDR``: what each node of a running cluster holds.

From the scheduler's registry (:func:`dckpt.cluster.registry`: the checkpoints each
worker serves, ``origin``, and the copies in its node cache, ``cached``;
:func:`dckpt.cluster.checkpoints`: per checkpoint its id, size, holders and URIs) and
every store's counters (:func:`dckpt.cluster.stats`). The registry lags the workers by
about ``dckpt.registry.interval``.
"""

from __future__ import annotations

import argparse
import socket
from typing import Any

from dckpt.cli import _output

NAME = "ls"
SUMMARY = "list the checkpoints each node of a running cluster holds"
DESCRIPTION = """\
Show what each node of a running Dask cluster holds: the checkpoints it serves
(origin) and the copies in its cache (cached), with their sizes, the pinned cache
entries, and each node store's counters (bytes sent and received, transfers, cache
hits and misses); then every checkpoint with its id (of its content), size, holders
(origin, cached, or restarted: served again by a restarted worker) and URIs. The cluster needs dckpt set up: dckpt.cluster.install(client), the
scheduler preload, or `dckpt cluster`.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``ls``."""
    parser.add_argument("--scheduler", required=True, metavar="ADDR", type=scheduler_address,
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
    """``{"scheduler": address, "workers": {worker address: {...}}, "checkpoints": {...}}``.

    Per worker: ``node_id``, ``age`` (seconds since its last snapshot), ``origin``
    and ``cached`` (``{checkpoint id: bytes}``) and ``stats`` (its store's counters).
    Per checkpoint id: ``size``, ``holders`` (``[{"node_id", "address", "kind"}]``,
    kind ``origin``, ``cached`` or ``restarted``) and ``uris``
    (:func:`dckpt.cluster.checkpoints`).
    """
    from distributed import Client  # the other subcommands do without distributed

    from dckpt.cluster import checkpoints, registry, stats

    _probe(address, timeout)
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, ValueError) as e:
        raise _output.CommandError(f"cannot reach a Dask scheduler at {address}: {e}") from e
    with client:
        holdings = registry(client)
        counters = stats(client)
        by_checkpoint = checkpoints(client)
        workers = {
            worker: {"node_id": held["node_id"], "origin": held["origin"],
                     "cached": held["cached"], "age": held["age"],
                     "stats": counters.get(worker)}
            for worker, held in holdings.items()
        }
        return {"scheduler": client.scheduler.address, "workers": workers,
                "checkpoints": by_checkpoint}


#: Schemes whose address is ``host:port``, which :func:`_probe` can try with a socket.
_HOST_PORT_SCHEMES = ("tcp", "tls", "ws", "wss")


def scheduler_address(text: str) -> str:
    """argparse type of ``--scheduler``: an address Dask can connect to, else a usage error.

    Checked before anything connects, so that a typo fails at once (exit status 2)
    instead of after the connect timeout.
    """
    from distributed.comm import parse_address, parse_host_port
    from distributed.comm.registry import backends

    scheme, location = parse_address(text)
    if scheme not in backends:
        raise argparse.ArgumentTypeError(
            f"{text!r} has the unknown protocol {scheme!r} (known: {', '.join(sorted(backends))});"
            " expected an address such as tcp://127.0.0.1:8786"
        )
    if scheme in _HOST_PORT_SCHEMES:
        try:
            host, port = parse_host_port(location)
        except ValueError:
            host, port = "", 0
        if not host or not isinstance(port, int) or not 0 < port < 65536:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not HOST:PORT with a port from 1 to 65535; expected an "
                "address such as tcp://127.0.0.1:8786"
            )
    return text


def _probe(address: str, timeout: float) -> None:
    """Fail fast, in one line, unless a Dask scheduler answers at ``address``.

    A failed ``Client(...)`` costs more than its timeout: distributed retries a
    refused connection until the timeout, then closes the half-made client, and its
    ``__del__`` prints a traceback after another wait. So first a TCP connect, which
    says "refused" at once, then distributed's handshake and an ``identity`` request,
    bounded by ``timeout``, which tell a scheduler from anything else listening.
    """
    import asyncio

    from distributed.comm import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme in _HOST_PORT_SCHEMES:
        host, port = parse_host_port(location)
        _connect(address, host, port, timeout)
    try:
        # distributed's handshake after the connect has no bound of its own.
        identity = asyncio.run(asyncio.wait_for(_identity(address, timeout), timeout))
    except Exception as e:  # noqa: BLE001 - whatever the peer did, it is no scheduler
        reason = (f"no answer within {timeout:g} s (--timeout)"
                  if isinstance(e, (TimeoutError, asyncio.TimeoutError))
                  else f"{type(e).__name__}: {e}"[:200])
        raise _output.CommandError(
            f"cannot reach a Dask scheduler at {address}: something listens there but "
            f"does not answer as one ({reason})"
        ) from e
    if not isinstance(identity, dict) or identity.get("type") != "Scheduler":
        kind = identity.get("type") if isinstance(identity, dict) else type(identity).__name__
        raise _output.CommandError(
            f"{address} is not a Dask scheduler (it says it is a {kind}); pass the "
            "scheduler's address"
        )


async def _identity(address: str, timeout: float) -> Any:
    import asyncio

    from distributed.comm import connect
    from distributed.security import Security

    comm = await connect(address, timeout=timeout,
                         **Security().get_connection_args("client"))
    try:
        await comm.write({"op": "identity", "reply": True})
        return await asyncio.wait_for(comm.read(), timeout)
    finally:
        comm.abort()


def _connect(address: str, host: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError as e:
        raise _output.CommandError(
            f"cannot reach a Dask scheduler at {address}: nothing listens there "
            f"(connection refused); is the scheduler running, and is the port right?"
        ) from e
    except TimeoutError as e:
        raise _output.CommandError(
            f"cannot reach a Dask scheduler at {address}: no answer within {timeout:g} s "
            "(--timeout)"
        ) from e
    except OSError as e:
        raise _output.CommandError(f"cannot reach a Dask scheduler at {address}: {e}") from e


def render(report: dict[str, Any]) -> str:
    """Two tables: the workers with their counters, then the checkpoints with their
    holders and URIs."""
    workers = report["workers"]
    rows = []
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
    held = [
        [checkpoint_id, _output.size(entry["size"]),
         ", ".join(f"{h['node_id']} ({h['kind']})"
                   for h in sorted(entry["holders"], key=lambda h: (h["node_id"], h["address"]))),
         " ".join(entry["uris"]) or "-"]
        for checkpoint_id, entry in sorted(report.get("checkpoints", {}).items())
    ]
    lines = [
        f"scheduler {report['scheduler']}: {len(workers)} workers",
        "",
        _output.table(["NODE", "WORKER", "ORIGIN", "CACHED", "PINNED", "SENT", "RECEIVED",
                       "TRANSFERS", "HITS", "MISSES"], rows),
        "",
    ]
    if held:
        lines.append(_output.table(["CHECKPOINT", "BYTES", "HOLDERS", "URIS"], held))
    else:
        lines.append("no checkpoints held")
    return "\n".join(lines)


def _count_and_size(checkpoints: dict[str, int]) -> str:
    return f"{len(checkpoints)} ({_output.size(sum(checkpoints.values()))})"
