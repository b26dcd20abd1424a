"""scheduler/launch_local_cluster.py starts a NodeCluster and stops it on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests._nodes import child_pids, lines_until_ready

LAUNCHER = Path(__file__).resolve().parents[2] / "scheduler" / "launch_local_cluster.py"


@pytest.mark.slow
def test_launcher_prints_the_cluster_and_stops_on_ctrl_c():
    before = child_pids()
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--nodes", "2", "--no-isolate"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        output = "".join(lines_until_ready(process))
        assert "scheduler: tcp://127.0.0.1:" in output, output + process.stderr.read()
        assert "node-0" in output and "node-1" in output
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert child_pids() == before
