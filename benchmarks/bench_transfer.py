"""Speed and memory of a node-to-node checkpoint copy, against baselines run in the same go.

    python benchmarks/bench_transfer.py [--size-mib 1024] [--files 64] [--repeat 5]
                                        [--chunk-bytes 8MiB] [--in-flight 1]
                                        [--nanny-environ] [--network] [--link-rate 1gbit]

Starts an isolated two-node ``NodeCluster`` (each worker in a mount namespace of its
own, so node 1 cannot read node 0's files), writes a checkpoint on node 0 itself (random
bytes, and a compressible variant: every 64 KiB, 32 KiB of random bytes then 32 KiB of
zeros, which lz4 halves) and copies it to node 1 three ways:

- socket: a task on node 0's worker streams the files over one TCP connection
  (``os.sendfile``) to a task on node 1's worker that writes them, in pieces of the
  size dckpt writes (``WRITE_PIECE_BYTES``): the fastest copy these two processes can
  make, and the yardstick;
- naive actor: a plain Dask actor on node 0 returns each file's bytes, one call at a
  time, to a task on node 1 that writes them;
- dckpt: ``NodeStore.fetch`` on node 1 (one Dask comm to node 0's worker: the
  manifest, then chunks, ``max-in-flight`` requests ahead, on the comm's bare socket
  on TCP), timed from the driver, so it also pays one driver round trip that the
  baselines, timed inside their receiving task, do not.

Best of ``--repeat`` runs of each step (5 by default), back to back, after one untimed
socket copy; speeds are printed as ratios to the socket copy of the same data because
these 2-core machines are noisy. The noise only ever adds time (below), so the best of
a few runs is each step's own cost: with 2, both runs of a step were often slow.
Memory: the growth of peak RSS (``VmHWM``, reset by writing 5 to
``/proc/PID/clear_refs``) of the sending and the receiving worker over their RSS before
the step, the worst over the repeats. CPU: user + system seconds of each worker during
the best run, and the user part of it (the page cache is filled in system time, which
this VM makes vary tenfold: user time is the steadier measure of a step's own work);
with two cores for two processes, a step that needs more CPU per byte cannot keep up
with the socket copy whatever its concurrency. Also: the pickled size of
a reference to the checkpoint, and the time and bytes of a second use of it on node 1
(a cache hit: no byte may move).

Why runs vary: on a virtual machine with free page reporting (printed when detected),
memory freed for more than a moment goes back to the hypervisor, and writing it again
(page cache included) costs 1 to 3 s of system time per GiB instead of ~0.25 s. A step
that starts right after another one freed its copy reuses warm pages; a slow step finds
cold ones, so slow steps vary most. A second is enough to make them cold: with a 1 s
pause before each run (a profiler attaching), every run of both steps took 2.7-4.2 s
per GiB, against 0.7-1.5 s without. Which pages a write finds also depends on the size
of the writes, before and now: the kernel's free lists are kept per block size, and
page-cache folios take the size of the writes that fill them. Measured here (1 GiB
written right after 1 GiB was written and deleted, system time): 256 KiB writes after
256 KiB writes 0.20-0.24 s, after 16 MiB writes 2.6-3.9 s. Hence the socket copy writes
in dckpt's piece size, and each step's repeats run back to back, so that every run but
a step's first finds what its own kind of writes freed (with the earlier order, dckpt
always came after the naive actor's 16 MiB writes). Read the ratios, and repeat.

Worker settings are handed over as ``DASK_DCKPT__TRANSFER__...`` environment variables
(workers do not see the driver's ``dask.config``). Everything (cluster, files) is
removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import time
import uuid
from typing import Any, Self

import dask.config
from dask.utils import format_bytes, parse_bytes

import dckpt  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt.cluster import NodeCluster, install
from dckpt._transfer._chunk_writer import WRITE_PIECE_BYTES
from dckpt.cluster._store import store_of

MIB = 1 << 20
_BLOCK = 64 * 1024  # the compressible pattern: half random, half zeros, per block
_NAME = ">HQ"  # socket baseline header: name length, file size (a str: it pickles)


# --- on node 0 --------------------------------------------------------------------------


def make_source(kind: str, size: int, n_files: int) -> dict[str, Any]:
    """Write a checkpoint of ``n_files`` files under this node's root (task, node 0)."""
    import lz4.block

    from dckpt import _node

    root = os.path.join(_node.node_root(), f"bench-src-{kind}-{uuid.uuid4().hex[:8]}")
    os.makedirs(root)
    per_file = size // n_files
    names = []
    for i in range(n_files):
        name = f"shard-{i:03d}.bin"
        names.append(name)
        with open(os.path.join(root, name), "wb") as f:
            remaining = per_file
            while remaining:
                piece = min(remaining, 16 * MIB)
                if kind == "random":
                    f.write(os.urandom(piece))
                else:
                    half = _BLOCK // 2
                    noise = memoryview(os.urandom(piece // 2 + half))
                    zeros = bytes(half)
                    out = bytearray()
                    for start in range(0, piece, _BLOCK):
                        out += noise[start // 2 : start // 2 + half]
                        out += zeros
                    f.write(memoryview(out)[:piece])
                remaining -= piece
    with open(os.path.join(root, names[0]), "rb") as f:
        sample = f.read(8 * MIB)
    ratio = len(lz4.block.compress(sample, store_size=False)) / len(sample)
    return {"path": root, "names": names, "bytes": per_file * n_files, "lz4_ratio": ratio}


def register(path: str) -> tuple[str, str]:
    """Let this node's store serve ``path`` under the id of its content (task, node 0).

    The id is the same at every repeat: the receiver evicts its copy after each one.
    """
    from dckpt.cluster._store import register_directory

    registration = register_directory(path)
    return registration.checkpoint_id, registration.manifest.digest


def make_reference(path: str) -> Any:
    """What a directory checkpoint pickled on this worker travels as (task, node 0)."""
    try:
        from dckpt.cluster._core import NodeRef  # noqa: F401
        from dckpt.cluster._resolve import make_ref
    except ImportError:
        return None
    return make_ref(path)


def socket_send(path: str, names: list[str], variable: str) -> float:
    """Stream the files to :func:`socket_receive` with ``os.sendfile`` (task, node 0)."""
    import socket

    from distributed import Variable

    host, port = Variable(variable).get(timeout=60)
    start = time.perf_counter()
    with socket.create_connection((host, port)) as sock:
        for name in names:
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                sock.sendall(struct.pack(_NAME, len(name), size) + name.encode())
                offset = 0
                while offset < size:
                    offset += os.sendfile(sock.fileno(), fd, offset, size - offset)
            finally:
                os.close(fd)
    return time.perf_counter() - start


# --- on node 1 --------------------------------------------------------------------------


def socket_receive(target: str, n_files: int, variable: str) -> float:
    """Accept one connection and write the files it brings (task, node 1).

    Timed from the accepted connection to the last file closed.
    """
    import socket

    from distributed import Variable, get_worker
    from distributed.comm import get_address_host

    os.makedirs(target)
    buffer = bytearray(WRITE_PIECE_BYTES)
    view = memoryview(buffer)
    # The worker's own address: on a network-isolated node, its veth (not the loopback).
    with socket.create_server((get_address_host(get_worker().address), 0)) as server:
        Variable(variable).set(server.getsockname()[:2])
        server.settimeout(120)
        conn, _ = server.accept()
        start = time.perf_counter()
        with conn:

            def read_exactly(n: int) -> bytes:
                data = bytearray()
                while len(data) < n:
                    piece = conn.recv(n - len(data))
                    if not piece:
                        raise ConnectionError("the sender closed the connection early")
                    data += piece
                return bytes(data)

            for _ in range(n_files):
                name_length, size = struct.unpack(_NAME, read_exactly(struct.calcsize(_NAME)))
                name = read_exactly(name_length).decode()
                with open(os.path.join(target, name), "wb", buffering=0) as f:
                    remaining = size
                    while remaining:
                        # A whole piece per write, as dckpt writes: the same page-cache
                        # folios for both (see "Why runs vary").
                        piece, filled = min(remaining, len(view)), 0
                        while filled < piece:
                            n = conn.recv_into(view[filled:piece])
                            if not n:
                                raise ConnectionError("the sender closed the connection early")
                            filled += n
                        f.write(view[:piece])
                        remaining -= piece
    return time.perf_counter() - start


class FileServer:
    """The naive actor: one whole file per call (lives on node 0)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()


def naive_receive(server: Any, names: list[str], target: str) -> float:
    """Ask the actor for each file in turn and write it (task, node 1)."""
    os.makedirs(target)
    start = time.perf_counter()
    for name in names:
        data = server.read(name).result()
        with open(os.path.join(target, name), "wb") as f:
            f.write(data)
        del data
    return time.perf_counter() - start


def node_path(name: str) -> str:
    """A fresh path under this node's root (task)."""
    from dckpt import _node

    return os.path.join(_node.node_root(), f"{name}-{uuid.uuid4().hex[:8]}")


def remove(path: str) -> None:
    """Remove a folder of this node (task)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def evict(checkpoint_id: str, dask_worker: Any) -> bool:
    """Drop a checkpoint from this node's cache, so the next fetch is a cold one."""
    from dckpt.cluster._cache import CheckpointId
    from dckpt.cluster._store import local_store

    return local_store(dask_worker)._cache.evict(CheckpointId(checkpoint_id))


def store_counters(dask_worker: Any) -> dict[str, Any]:
    from dckpt.cluster._store import local_store

    return local_store(dask_worker).stats()


def transfer_settings() -> dict[str, Any]:
    # Read key by key: dask.config.get treats "-" and "_" alike, a DASK_... variable
    # sets the "_" spelling beside the default's "-".
    return {key: dask.config.get(f"dckpt.transfer.{key}")
            for key in ("chunk-bytes", "max-in-flight", "compression")}


# --- the driver -------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """``(user + system, user)`` CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[11]) / tick


class Probe:
    """Peak RSS growth (over RSS when entered) and CPU seconds of some processes.

    ``user`` is the part spent outside the kernel: the copying into the page cache,
    whose cost this VM makes vary tenfold, is system time, so ``user`` mostly tells a
    process's own work apart from what the memory it happened to get cost (mostly: a
    socket sender's user time was seen at 0.24 s and 0.41 s for the same GiB).
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.growth_kib: list[int] = []
        self.cpu: list[float] = []
        self.user: list[float] = []

    def __enter__(self) -> Self:
        self.before = []
        for pid in self.pids:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.before.append(_status_kib(pid, "VmRSS"))
        self.cpu_before = [_cpu_seconds(pid) for pid in self.pids]
        return self

    def __exit__(self, *exc_info: object) -> None:
        after = [_cpu_seconds(pid) for pid in self.pids]
        self.cpu = [a[0] - b[0] for a, b in zip(after, self.cpu_before)]
        self.user = [a[1] - b[1] for a, b in zip(after, self.cpu_before)]
        self.growth_kib = [
            _status_kib(pid, "VmHWM") - before for pid, before in zip(self.pids, self.before)
        ]


class Bench:
    def __init__(self, cluster: NodeCluster, client: Any) -> None:
        self.cluster, self.client = cluster, client
        self.sender, self.receiver = (n.worker_address for n in cluster.nodes[:2])
        self.pids = [cluster.nodes[0].pid, cluster.nodes[1].pid]

    def on(self, address: str, function: Any, *args: Any) -> Any:
        return self.client.submit(function, *args, workers=[address], pure=False,
                                  allow_other_workers=False)

    def socket_copy(self, source: dict[str, Any]) -> tuple[float, Probe]:
        target = self.on(self.receiver, node_path, "bench-socket").result()
        variable = f"bench-port-{uuid.uuid4().hex}"
        os.sync()
        with Probe(self.pids) as probe:
            received = self.on(self.receiver, socket_receive, target, len(source["names"]),
                               variable)
            sent = self.on(self.sender, socket_send, source["path"], source["names"], variable)
            sent.result()
            seconds = received.result()
        self.on(self.receiver, remove, target).result()
        return seconds, probe

    def naive_copy(self, source: dict[str, Any]) -> tuple[float, Probe]:
        # The actor lives as long as this future: pass the future, the task gets the actor.
        server = self.client.submit(FileServer, source["path"], workers=[self.sender],
                                    actor=True, pure=False)
        server.result()
        target = self.on(self.receiver, node_path, "bench-naive").result()
        os.sync()
        with Probe(self.pids) as probe:
            seconds = self.on(self.receiver, naive_receive, server, source["names"],
                              target).result()
        self.on(self.receiver, remove, target).result()
        del server
        return seconds, probe

    def dckpt_copy(self, source: dict[str, Any]) -> tuple[float, Probe, dict[str, Any]]:
        checkpoint_id, digest = self.on(self.sender, register, source["path"]).result()
        store = store_of(self.receiver, self.client)
        os.sync()
        before = self.counters()
        with Probe(self.pids) as probe:
            start = time.perf_counter()
            path = store.fetch(self.sender, checkpoint_id, digest).result()
            seconds = time.perf_counter() - start
        after = self.counters()
        # Second use on the same node: the cache must answer, no byte may move.
        start = time.perf_counter()
        again = store.fetch(self.sender, checkpoint_id, digest).result()
        second = time.perf_counter() - start
        final = self.counters()
        self.client.run(evict, checkpoint_id, workers=[self.receiver])
        return seconds, probe, {
            "received": after["bytes_received"] - before["bytes_received"],
            "second_seconds": second,
            "second_bytes": final["bytes_received"] - after["bytes_received"],
            "same_path": again == path,
            "cache_hits": final["cache_hits"] - after["cache_hits"],
        }

    def counters(self) -> dict[str, Any]:
        return self.client.run(store_counters, workers=[self.receiver])[self.receiver]


def _page_reporting_note() -> str:
    """A warning line when this (virtual) machine hands freed memory back to its host."""
    try:
        with open("/sys/module/page_reporting/parameters/page_reporting_order") as f:
            order = int(f.read())
    except (OSError, ValueError):
        return ""
    return (f"note: free page reporting is on (blocks of {4 << order} KiB and up): memory "
            "freed here goes back to the hypervisor and costs 1 to 3 s of system time "
            "per GiB to touch again; slow steps lose most to it (see the module docstring)")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="best of N for each step")
    parser.add_argument("--chunk-bytes", help="dckpt.transfer.chunk-bytes, e.g. 8MiB")
    parser.add_argument("--in-flight", type=int, help="dckpt.transfer.max-in-flight")
    parser.add_argument(
        "--nanny-environ", action="store_true",
        help="give the workers the environment a nanny would (distributed.nanny."
             "pre-spawn-environ, e.g. MALLOC_TRIM_THRESHOLD_), as `dask worker` has by default",
    )
    parser.add_argument("--network", action="store_true",
                        help="each node in a network namespace of its own (needs root)")
    parser.add_argument("--link-rate", help="e.g. 1gbit: each node's link limited by tc tbf")
    args = parser.parse_args()

    env = {}
    if args.chunk_bytes is not None:
        env["DASK_DCKPT__TRANSFER__CHUNK_BYTES"] = str(parse_bytes(args.chunk_bytes))
    if args.in_flight is not None:
        env["DASK_DCKPT__TRANSFER__MAX_IN_FLIGHT"] = str(args.in_flight)
    if args.nanny_environ:
        env.update({str(k): str(v) for k, v in
                    dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()})
    size = args.size_mib * MIB

    started = time.perf_counter()
    network: dict[str, Any] = {}
    if args.network or args.link_rate:
        network = {"network": True, "link_rate": args.link_rate}
    with NodeCluster(n_nodes=2, isolate=True, env=env, **network) as cluster, \
            cluster.client(set_as_default=False) as client:
        install(client)
        bench = Bench(cluster, client)
        settings = client.run(transfer_settings, workers=[bench.receiver])[bench.receiver]
        chunk_bytes = parse_bytes(settings["chunk-bytes"])
        sources = {kind: bench.on(bench.sender, make_source, kind, size, args.files).result()
                   for kind in ("random", "compressible")}
        try:
            ref = bench.on(bench.sender, make_reference, sources["random"]["path"]).result()
            # Untimed: the first copy after start-up touches memory no process has used yet,
            # which this VM makes slow (see "free page reporting" in the output).
            bench.socket_copy(sources["random"])
            steps = [(kind, name) for kind in sources for name in ("socket", "naive", "dckpt")]
            best: dict[tuple[str, str], tuple[float, Probe]] = {}
            memory: dict[tuple[str, str], list[int]] = {}
            second: dict[str, Any] = {}
            # Each step's runs back to back: every run after a step's first finds the
            # memory its own last run freed (see "Why runs vary" above).
            for kind, name in steps:
                for _ in range(args.repeat):
                    source = sources[kind]
                    if name == "socket":
                        seconds, probe = bench.socket_copy(source)
                    elif name == "naive":
                        seconds, probe = bench.naive_copy(source)
                    else:
                        seconds, probe, info = bench.dckpt_copy(source)
                        if info["received"] != source["bytes"]:
                            raise AssertionError(f"dckpt received {info['received']} bytes, "
                                                 f"expected {source['bytes']}")
                        if kind == "random" and info["second_seconds"] < second.get(
                                "second_seconds", float("inf")):
                            second = info
                    key = (kind, name)
                    if key not in best or seconds < best[key][0]:
                        best[key] = (seconds, probe)
                    memory[key] = [max(a, b) for a, b in
                                   zip(memory.get(key, probe.growth_kib), probe.growth_kib)]
        finally:
            for source in sources.values():
                bench.on(bench.sender, remove, source["path"]).result()

        total = sources["random"]["bytes"]
        print(f"{format_bytes(total)} in {args.files} files, node 0 -> node 1 of an isolated "
              f"NodeCluster, best of {args.repeat}; chunk-bytes {format_bytes(chunk_bytes)}, "
              f"max-in-flight {settings['max-in-flight']}, compression "
              f"{settings['compression']}; network: "
              f"{('own, link ' + (args.link_rate or 'unlimited')) if network else 'loopback'}")
        print(f"compressible variant: lz4 ratio {sources['compressible']['lz4_ratio']:.2f} "
              f"(random: {sources['random']['lz4_ratio']:.2f})")
        note = _page_reporting_note()
        if note:
            print(note)
        print(f"{'step':<31}{'GB/s':>6}{'x socket':>10}{'peak RSS growth (MiB)':>23}"
              f"{'CPU s of best':>15}{'of it user':>12}")
        print(f"{'':<47}{'sender':>9}{'receiver':>10}{'send/recv':>14}{'send/recv':>12}")
        labels = {"socket": "socket (sendfile)", "naive": "naive actor", "dckpt": "dckpt"}
        for kind, name in steps:
            seconds, probe = best[(kind, name)]
            ratio = best[(kind, "socket")][0] / seconds
            sent, received = (g / 1024 for g in memory[(kind, name)])
            print(f"{labels[name] + ', ' + kind:<31}{total / seconds / 1e9:>6.2f}{ratio:>9.2f}x"
                  f"{sent:>10.1f}{received:>10.1f}{probe.cpu[0]:>8.2f}/{probe.cpu[1]:.2f}"
                  f"{probe.user[0]:>7.2f}/{probe.user[1]:.2f}")

        print()
        worst_kib = max(memory[("random", "dckpt")] + memory[("compressible", "dckpt")])
        chunks = worst_kib * 1024 / chunk_bytes
        if ref is not None:
            ref_size, ref_what = len(pickle.dumps(ref)), type(ref).__name__
        else:
            ref_size = len(pickle.dumps(("node-0", sources["random"]["path"], "0" * 32,
                                         total, "0" * 64, bench.sender)))
            ref_what = "no NodeRef here; (node_id, path, checkpoint_id, size, digest, " \
                       "store address) tuple"
        for kind in sources:
            ratio = best[(kind, "socket")][0] / best[(kind, "dckpt")][0]
            print(f"dckpt / socket throughput, {kind}: {ratio:.2f}x (target >= 0.8x) "
                  f"{_verdict(ratio >= 0.8)}")
        print(f"dckpt / naive actor throughput, random: "
              f"{best[('random', 'naive')][0] / best[('random', 'dckpt')][0]:.2f}x")
        print(f"dckpt peak RSS growth, worst side, variant and run: {worst_kib / 1024:.1f} MiB "
              f"= {chunks:.2f} chunks (target < 4) {_verdict(chunks < 4)}")
        print(f"pickled reference ({ref_what}): {ref_size} bytes (target < 2048) "
              f"{_verdict(ref_size < 2048)}")
        print(f"second use on node 1: {second['second_seconds'] * 1000:.1f} ms, "
              f"{second['second_bytes']} bytes received, {second['cache_hits']} cache hit "
              f"(target 0 bytes) {_verdict(second['second_bytes'] == 0 and second['same_path'])}")
        print(f"({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
