"""Speed and memory of the packed byte format, against baselines run in the same go.

    python benchmarks/bench_packing.py [--size-mib 2048] [--files 32] [--data text]

Packs a directory of random (incompressible) files -- or, with ``--data text``, of
log-like text that lz4 shrinks to about a third -- to a file on disk and unpacks it
again, each step in a fresh subprocess so that its peak resident memory (``VmHWM``)
is its own. Baselines: the standard library's ``tarfile`` doing the same job (an
uncompressed tar stream), and a plain copy of the files (the I/O floor). Figures are
printed as ratios to those baselines because these machines are noisy; memory as the
growth of peak RSS over the process's RSS before the step. CPU seconds (user + system,
of the step's process) are printed too: on a shared machine they vary less than wall
time.

Fairness: every step starts after an ``os.sync()`` (not timed), so that no step pays
for writing back the dirty pages of the one before it, and each repeat runs the
dckpt/tar pairs in the other order.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

MIB = 1 << 20

STEP = textwrap.dedent(
    """
    import json, os, shutil, sys, tarfile, time

    def rss_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    step, src, dst = sys.argv[1:4]
    if step.startswith("dckpt"):
        from dckpt._formats import pack_directory, unpack_to_directory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = rss_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    if step == "dckpt-pack":
        with open(dst, "wb") as out:
            pack_directory(src, out)
    elif step == "dckpt-unpack":
        os.mkdir(dst)
        with open(src, "rb") as inp:
            unpack_to_directory(inp, dst)
    elif step == "tar-pack":
        with tarfile.open(dst, "w") as tar:
            tar.add(src, arcname=".")
    elif step == "tar-unpack":
        with tarfile.open(src, "r") as tar:
            tar.extractall(dst, filter="data")
    elif step == "copy":
        shutil.copytree(src, dst)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(json.dumps({"seconds": seconds, "cpu": cpu,
                      "peak_growth_kib": rss_kib("VmHWM") - before}))
    """
)


def run_step(step: str, src: str, dst: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", STEP, step, src, dst],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def text_block(size: int, seed: int) -> bytes:
    """Log-like lines (steps, losses, learning rates): compressible, not trivially."""
    rng = random.Random(seed)
    lines, total = [], 0
    while total < size:
        line = (f"step {rng.randrange(10**6)} loss {rng.random():.6f} "
                f"lr {rng.choice(('1e-3', '5e-4', '1e-4'))} ok\n").encode()
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def make_source(root: str, size_mib: int, n_files: int, data: str) -> None:
    os.makedirs(root)
    per_file = size_mib * MIB // n_files
    blocks = [text_block(16 * MIB, seed) for seed in range(2)] if data == "text" else []
    written = 0
    for i in range(n_files):
        with open(os.path.join(root, f"shard-{i:03d}.bin"), "wb") as f:
            remaining = per_file
            while remaining:
                piece = min(remaining, 16 * MIB)
                if blocks:  # blocks 16 MiB apart repeat: far beyond lz4's 64 KiB window
                    f.write(blocks[written % 2][:piece])
                else:
                    f.write(os.urandom(piece))
                remaining -= piece
                written += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="best of N for each step")
    parser.add_argument("--data", choices=("random", "text"), default="random",
                        help="incompressible bytes (model weights) or compressible text")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="dckpt-bench-", dir=os.environ.get("BENCH_DIR"))
    try:
        src = os.path.join(work, "src")
        make_source(src, args.size_mib, args.files, args.data)
        packed, tarball = os.path.join(work, "packed"), os.path.join(work, "tarball")
        results: dict[str, dict[str, float]] = {}
        steps = [
            ("copy", src, os.path.join(work, "copy")),
            ("tar-pack", src, tarball),
            ("dckpt-pack", src, packed),
            ("tar-unpack", tarball, os.path.join(work, "tar-out")),
            ("dckpt-unpack", packed, os.path.join(work, "dckpt-out")),
        ]
        for repeat in range(args.repeat):
            # copy first, then the pack pair, then the unpack pair; each pair's order
            # alternates between repeats.
            order = steps if repeat % 2 == 0 else [steps[0], steps[2], steps[1],
                                                   steps[4], steps[3]]
            for step, a, b in order:
                for leftover in (b,) if step in ("copy", "tar-unpack", "dckpt-unpack") else ():
                    shutil.rmtree(leftover, ignore_errors=True)
                os.sync()
                r = run_step(step, a, b)
                best = results.get(step)
                if best is None or r["seconds"] < best["seconds"]:
                    results[step] = r
        size = args.size_mib * MIB
        print(f"{args.size_mib} MiB in {args.files} {args.data} files, best of {args.repeat}")
        print(f"{'step':<14}{'GB/s':>8}{'CPU s':>8}{'peak RSS growth':>18}")
        for step, r in results.items():
            growth = r["peak_growth_kib"] / 1024
            print(f"{step:<14}{size / r['seconds'] / 1e9:>8.2f}{r['cpu']:>8.2f}"
                  f"{growth:>15.1f} MiB")
        for what in ("pack", "unpack"):
            mine, tar = results[f"dckpt-{what}"], results[f"tar-{what}"]
            print(f"dckpt {what:<6} / tar {what:<6} time ratio: "
                  f"{mine['seconds'] / tar['seconds']:.2f} (CPU time ratio "
                  f"{mine['cpu'] / tar['cpu']:.2f})")
        print(f"dckpt pack   / plain copy time ratio: "
              f"{results['dckpt-pack']['seconds'] / results['copy']['seconds']:.2f}")
        print(f"packed size / data size: {os.path.getsize(packed) / size:.4f}")
        worst = max(results["dckpt-pack"]["peak_growth_kib"],
                    results["dckpt-unpack"]["peak_growth_kib"]) / 1024
        print(f"dckpt peak RSS growth / data size: {worst * MIB / size:.5f} "
              f"({worst:.1f} MiB for {args.size_mib} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
