"""dckpt.train._torch_distributed in one process: joining torch.distributed after a failed attempt.

torch==2.13.0 is a test dependency, so these run in CI (no importorskip).
"""

from __future__ import annotations

import dataclasses
import socket
import threading

import dask.config
import pytest

from dckpt.train import _torch_distributed
from dckpt.train._session import TrainContext

dist = pytest.importorskip("torch.distributed")


def _master() -> tuple[str, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return "127.0.0.1", int(sock.getsockname()[1])


def test_a_new_attempts_rank_waits_for_the_failed_attempts_rank_to_leave(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # restored after the test: init sets them
    old = TrainContext(world_rank=0, world_size=1, local_rank=0, local_world_size=1,
                       node_rank=0, node_id="node-0", run_name="run", attempt=0)
    new = dataclasses.replace(old, attempt=1)
    _torch_distributed.init_process_group(old, _master())  # the failed attempt's rank, not gone yet
    try:
        asked, errors = threading.Event(), []
        real = dist.is_initialized

        def is_initialized() -> bool:
            if threading.current_thread() is joiner:
                asked.set()  # the new rank looked at the group
            return real()

        def join() -> None:
            try:
                _torch_distributed.init_process_group(new, _master())
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        monkeypatch.setattr(dist, "is_initialized", is_initialized)
        joiner = threading.Thread(target=join)
        joiner.start()
        assert asked.wait(timeout=60), errors
        _torch_distributed.destroy_process_group()  # the old rank leaves: the new one may join
        joiner.join(timeout=60)
        assert not joiner.is_alive() and errors == []
        assert real() and dist.get_world_size() == 1
    finally:
        _torch_distributed.destroy_process_group()


def test_a_group_never_left_is_a_clear_error(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")
    context = TrainContext(world_rank=0, world_size=1, local_rank=0, local_world_size=1,
                           node_rank=0, node_id="node-0", run_name="run", attempt=0)
    _torch_distributed.init_process_group(context, _master())
    try:
        with dask.config.set({"dckpt.train.worker-wait-timeout": "50ms"}), \
                pytest.raises(RuntimeError, match="earlier attempt in this worker process "
                                                  "still holds its process group"):
            _torch_distributed.init_process_group(dataclasses.replace(context, attempt=1), _master())
    finally:
        _torch_distributed.destroy_process_group()
