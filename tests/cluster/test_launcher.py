"""scheduler/launch_local_cluster.py starts a NodeCluster and stops it on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests._nodes import child_pids, lines_until_ready

LAUNCHER = Path(__file__).resolve().parents[2] / "scheduler" / "launch_local_cluster.py"


def _run_until_ready_then_ctrl_c(*args: str) -> str:
    """Start the launcher with ``args``, wait for its ready line, press Ctrl-C: what it
    printed. It must exit 0 and leave no process behind."""
    before = child_pids()
    process = subprocess.Popen([sys.executable, str(LAUNCHER), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        output = "".join(lines_until_ready(process))
        assert "scheduler: " in output, output + process.stderr.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert child_pids() == before
    return output


@pytest.mark.slow
def test_launcher_prints_the_cluster_and_stops_on_ctrl_c():
    output = _run_until_ready_then_ctrl_c("--nodes", "2", "--no-isolate")
    assert "scheduler: tcp://127.0.0.1:" in output
    assert "node-0" in output and "node-1" in output


@pytest.mark.slow
def test_launcher_puts_nodes_on_a_network_of_their_own():
    from dckpt.cluster import network_isolation_available

    if not network_isolation_available(link_rate=True):
        pytest.skip("network namespaces or tc tbf are not available here")
    output = _run_until_ready_then_ctrl_c("--nodes", "1", "--network", "--link-rate", "1gbit")
    assert "scheduler: tcp://10.220." in output, output
    bridge = re.search(r"network: 10\.220\.\d+\.0/24 on bridge (\S+), 1000000000 bit/s", output)
    assert bridge, output
    assert re.search(r"node-0: tcp://10\.220\.\d+\.10:", output), output
    tag = bridge[1].removesuffix("br")
    links = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True, text=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    assert tag not in links and tag not in netns


def _wait_for_exit(pids: set[int], timeout: float) -> set[int]:
    """Wait until each of ``pids`` has exited (pidfds: woken by the kernel, no polling);
    the ones still running after ``timeout`` seconds."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass  # gone already
    deadline = time.monotonic() + timeout
    try:
        while fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(fds), [], [], deadline - time.monotonic())
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return set(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.slow
def test_a_killed_launcher_takes_its_cluster_with_it():
    process = subprocess.Popen([sys.executable, str(LAUNCHER), "--nodes", "2", "--no-isolate"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cluster: set[int] = set()
    try:
        output = "".join(lines_until_ready(process))
        assert "scheduler: " in output, output + process.stderr.read()
        # The scheduler and the two workers, each in a session of its own.
        cluster = {p.pid for p in psutil.Process(process.pid).children()}
        assert len(cluster) == 3, cluster
        process.kill()  # SIGKILL: no finalizer, no close
        process.wait()
        left = _wait_for_exit(cluster, timeout=60)
        assert not left, f"still running after the launcher was killed: {left}"
    finally:
        for pid in cluster:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
