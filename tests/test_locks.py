"""dckpt._locks: which processes count as alive, and the flock a holder may unlink."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dckpt._locks import flocked, is_alive, marker_is_alive, marker_pid, new_marker_name
from tests._waiting import eventually


def test_this_process_is_alive_and_a_reaped_one_is_not():
    assert is_alive(os.getpid())
    process = subprocess.Popen(["true"])
    process.wait()
    assert not is_alive(process.pid)
    assert not is_alive(0) and not is_alive(-1)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombies are told apart by /proc")
def test_a_zombie_is_not_alive():
    process = subprocess.Popen(["true"])
    try:
        eventually(lambda: b") Z " in Path(f"/proc/{process.pid}/stat").read_bytes(),
                   what="the child to exit")
        os.kill(process.pid, 0)  # a zombie still answers kill(0) ...
        assert not is_alive(process.pid)  # ... but holds nothing
    finally:
        process.wait()


def test_marker_names_start_with_the_pid():
    name = new_marker_name(".suffix")
    assert marker_pid(name) == os.getpid() and name.endswith(".suffix")
    assert marker_is_alive(name)
    assert marker_pid("abc.def") is None and not marker_is_alive("abc.def")
    assert marker_pid("-5.x") is None


def test_a_holder_may_unlink_the_lock_file(tmp_path):
    lock = str(tmp_path / "x.lock")
    with flocked(lock) as fd:
        assert os.fstat(fd).st_ino == os.stat(lock).st_ino
        os.unlink(lock)
    with flocked(lock):  # a fresh file, locked as usual
        assert os.path.exists(lock)
