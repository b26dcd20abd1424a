"""Incremental checkpoints: fine-tuning steps whose frozen files never change.

    python benchmarks/bench_incremental.py [--size 1GiB] [--steps 10] [--files 20]
                                           [--frozen 0.9]

Starts an isolated two-node ``NodeCluster`` (each worker in a mount namespace of its
own: node 1 cannot read node 0's files) and plays a fine-tuning run on node 0: step 0
writes a checkpoint of ``--size`` bytes in ``--files`` equal files, of which the first
``--frozen`` share (the frozen base) never changes; each of the ``--steps`` steps that
follow writes a whole new directory, as a training loop saves one, with the frozen
files written again (the same bytes in new files, new inodes) and the others with new
random bytes. After each step node 1 fetches the new checkpoint
(``NodeStore.fetch``), holding every earlier one in its cache. Node 0 keeps its last
two steps only (its node root is in memory).

Measured, against the baselines of the same run:

- bytes moved per step to node 1: the file bytes node 1 received (``bytes_received``)
  plus the manifest (its JSON size, about what it weighs in msgpack), as a ratio to the
  bytes that changed in that step. Target: <= 1.1x. Node 0's ``bytes_sent`` is shown
  beside it.
- node 1's cache after the last step: ``bytes_cached`` (what the budget counts) and
  the bytes on disk (distinct inodes under the cache folder, counted by the receiver),
  against the sum of the cached checkpoints' sizes (what a cache that shares nothing
  would hold). Target: <= 1.2 x size + the bytes changed over all steps (the frozen
  files once, every version of the others once, 20% of the size to spare).
- time: the full copy of step 0 against the median incremental step (information only;
  the machine is shared).

Prints the figures and PASS/FAIL per target. Everything (cluster, files) is removed at
the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from typing import Any

from dask.utils import format_bytes, parse_bytes

import dckpt  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt.cluster import NodeCluster, install
from dckpt.cluster._store import store_of

_WRITE_BLOCK = 16 << 20


# --- on node 0 --------------------------------------------------------------------------


def write_step(previous: str | None, n_files: int, n_frozen: int, file_bytes: int) -> str:
    """A new checkpoint directory under this node's root (task, node 0).

    Frozen files are copied from ``previous`` (new files, the same bytes); the others,
    and every file of step 0, get fresh random bytes.
    """
    import shutil

    from dckpt import _node

    path = os.path.join(_node.node_root(), f"bench-step-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    for i in range(n_files):
        name = f"{'frozen' if i < n_frozen else 'tuned'}-{i:03d}.bin"
        if previous is not None and i < n_frozen:
            shutil.copyfile(os.path.join(previous, name), os.path.join(path, name))
            continue
        with open(os.path.join(path, name), "wb") as f:
            remaining = file_bytes
            while remaining:
                piece = min(remaining, _WRITE_BLOCK)
                f.write(os.urandom(piece))
                remaining -= piece
    return path


def register(path: str) -> tuple[str, str, int]:
    """Serve ``path`` from this node (task, node 0): its id, digest and manifest's size."""
    from dckpt.cluster._store import register_directory

    registration = register_directory(path)
    manifest_bytes = len(json.dumps(registration.manifest.to_dict()))
    return registration.checkpoint_id, registration.manifest.digest, manifest_bytes


def remove(path: str) -> None:
    """Remove a folder of this node (task)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --- on node 1 --------------------------------------------------------------------------


def store_counters(dask_worker: Any) -> dict[str, Any]:
    from dckpt.cluster._store import local_store

    return local_store(dask_worker).stats()


def cache_on_disk(dask_worker: Any) -> dict[str, int]:
    """The node cache's checkpoints: the sum of their sizes, and the bytes they take on
    disk, each inode counted once (task, node 1)."""
    from dckpt.cluster._store import local_store

    cache = local_store(dask_worker)._cache
    seen: set[tuple[int, int]] = set()
    on_disk = 0
    for entry in cache.entries():
        for dirpath, _, filenames in os.walk(entry.path):
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    on_disk += st.st_size
    return {"sizes": sum(e.size for e in cache.entries()), "on_disk": on_disk,
            "entries": len(cache.entries())}


# --- the driver -------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1GiB", help="checkpoint size, e.g. 256MiB")
    parser.add_argument("--steps", type=int, default=10, help="fine-tuning steps after step 0")
    parser.add_argument("--files", type=int, default=20, help="files per checkpoint")
    parser.add_argument("--frozen", type=float, default=0.9,
                        help="share of the files (and bytes) that never change")
    args = parser.parse_args()
    n_files = args.files
    n_frozen = round(n_files * args.frozen)
    if not 0 <= n_frozen < n_files:
        parser.error("--frozen must leave at least one file that changes")
    file_bytes = int(parse_bytes(args.size)) // n_files
    size = file_bytes * n_files
    changed_per_step = (n_files - n_frozen) * file_bytes

    started = time.perf_counter()
    with NodeCluster(n_nodes=2, isolate=True) as cluster, \
            cluster.client(set_as_default=False) as client:
        install(client)
        sender, receiver = (n.worker_address for n in cluster.nodes[:2])
        store = store_of(receiver, client)

        def on(address: str, function: Any, *a: Any) -> Any:
            return client.submit(function, *a, workers=[address], pure=False,
                                 allow_other_workers=False).result()

        def counters() -> tuple[dict[str, Any], dict[str, Any]]:
            both = client.run(store_counters, workers=[sender, receiver])
            return both[sender], both[receiver]

        kept: list[str] = []
        rows: list[dict[str, Any]] = []
        try:
            for step in range(args.steps + 1):
                path = on(sender, write_step, kept[-1] if kept else None, n_files, n_frozen,
                          file_bytes)
                kept.append(path)
                checkpoint_id, digest, manifest_bytes = on(sender, register, path)
                sent_before, received_before = counters()
                start = time.perf_counter()
                store.fetch(sender, checkpoint_id, digest).result()
                seconds = time.perf_counter() - start
                sent_after, received_after = counters()
                received = received_after["bytes_received"] - received_before["bytes_received"]
                rows.append({
                    "step": step, "seconds": seconds, "manifest": manifest_bytes,
                    "changed": size if step == 0 else changed_per_step,
                    "received": received,
                    "moved": received + manifest_bytes,
                    "sent": sent_after["bytes_sent"] - sent_before["bytes_sent"],
                    "reused": (received_after.get("bytes_reused", 0)
                               - received_before.get("bytes_reused", 0)),
                })
                while len(kept) > 2:
                    on(sender, remove, kept.pop(0))
            cache = client.run(cache_on_disk, workers=[receiver])[receiver]
            cached = counters()[1]["cache"]["bytes_cached"]
        finally:
            for path in kept:
                on(sender, remove, path)

    print(f"{args.steps} steps after step 0 of a {format_bytes(size)} checkpoint in {n_files} "
          f"files, {n_frozen} of them frozen ({format_bytes(size - changed_per_step)}); "
          f"{format_bytes(changed_per_step)} change per step; node 0 -> node 1 of an "
          "isolated NodeCluster")
    print(f"{'step':>4}{'changed':>12}{'received':>12}{'manifest':>10}{'moved/changed':>15}"
          f"{'sent':>12}{'linked':>12}{'seconds':>9}")
    for row in rows:
        print(f"{row['step']:>4}{format_bytes(row['changed']):>12}"
              f"{format_bytes(row['received']):>12}{row['manifest']:>10}"
              f"{row['moved'] / row['changed']:>14.3f}x{format_bytes(row['sent']):>12}"
              f"{format_bytes(row['reused']):>12}{row['seconds']:>9.2f}")
    incremental = rows[1:]
    worst = max(row["moved"] / row["changed"] for row in incremental)
    changed_total = sum(row["changed"] for row in incremental)
    cache_target = 1.2 * size + changed_total
    full_seconds = rows[0]["seconds"]
    median_seconds = statistics.median(row["seconds"] for row in incremental)
    print()
    print(f"bytes moved per step / bytes changed, worst of {len(incremental)} steps: "
          f"{worst:.3f}x (target <= 1.1x) {_verdict(worst <= 1.1)}")
    print(f"node 1's cache after {args.steps} steps ({cache['entries']} checkpoints): "
          f"{format_bytes(cached)} counted, {format_bytes(cache['on_disk'])} on disk; "
          f"without sharing {format_bytes(cache['sizes'])} "
          f"(target <= 1.2 x {format_bytes(size)} + {format_bytes(changed_total)} changed = "
          f"{format_bytes(int(cache_target))}) "
          f"{_verdict(cached <= cache_target and cache['on_disk'] <= cache_target)}")
    print(f"time: step 0 (full copy) {full_seconds:.2f} s, median incremental step "
          f"{median_seconds:.2f} s ({full_seconds / median_seconds:.1f}x faster)")
    print(f"({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
