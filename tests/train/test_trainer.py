"""DataParallelTrainer on an isolated three-node cluster: reports, placement, resume,
failures. Each node's disk is its own, so a resumed rank that reads its checkpoint
had it fetched from the node that wrote it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid

import dask.config
import distributed
import pytest

from dckpt import Checkpoint, _node
from dckpt.cluster import isolation_available
from dckpt.cluster._store import driver_store
from dckpt.train import (
    CheckpointConfig,
    CheckpointManager,
    DataParallelTrainer,
    TrainingFailedError,
    fit,
    get_checkpoint,
    get_context,
    report,
)
from tests.train.conftest import N_NODES, FakeManager, node_1_killed_at

pytestmark = pytest.mark.slow


def _save(epoch: int) -> Checkpoint:
    """A directory checkpoint of ``epoch`` under this node's root."""
    context = get_context()
    path = os.path.join(_node.node_root(), "train-tests", context.run_name,
                        f"attempt-{context.attempt}-rank-{context.world_rank}-epoch-{epoch}")
    os.makedirs(path)
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump({"epoch": epoch}, f)
    return Checkpoint.from_directory(path)


def _epoch_of(checkpoint: Checkpoint | None) -> int | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path, open(os.path.join(path, "state.json")) as f:
        return int(json.load(f)["epoch"])


def _train(config):
    """Epochs from the one after the checkpoint's; every rank reports a checkpoint.

    On a fresh start with ``config["pause_at"]``, every rank waits before that epoch
    until ``config["event"]`` is set (the test kills a node meanwhile).
    """
    context = get_context()
    resumed_from = _epoch_of(get_checkpoint())
    start = 0 if resumed_from is None else resumed_from + 1
    for epoch in range(start, config["epochs"]):
        if resumed_from is None and epoch == config.get("pause_at"):
            distributed.Event(config["event"]).wait(30)
        report({"epoch": epoch, "loss": 1.0 / (epoch + 1), "node_id": context.node_id,
                "resumed_from": resumed_from}, checkpoint=_save(epoch))


def test_reports_of_all_ranks_arrive_and_rank_0s_checkpoints_stay_on_their_node(client):
    manager = FakeManager()
    result = DataParallelTrainer(
        _train, train_loop_config={"epochs": 3}, num_workers=N_NODES,
        checkpoint_manager=manager, client=client,
    ).fit()

    history = result.metrics_history
    assert sorted((e["world_rank"], e["epoch"]) for e in history) == [
        (rank, epoch) for rank in range(N_NODES) for epoch in range(3)
    ]
    assert all(e["resumed_from"] is None for e in history)  # a fresh start
    # One rank per node.
    nodes = {e["world_rank"]: e["node_id"] for e in history}
    assert sorted(nodes.values()) == [f"node-{i}" for i in range(N_NODES)]
    # Only rank 0's checkpoints are registered, with its metrics, from the driver's thread.
    assert [(m["world_rank"], m["epoch"]) for _, m in manager.registered] == [(0, 0), (0, 1), (0, 2)]
    assert manager.thread_ids == {threading.get_ident()}
    assert not manager.closed  # an injected manager belongs to the caller
    # The checkpoint reached the driver as a reference: its bytes were not copied.
    kind, ref = result.checkpoint.get_internal_representation()
    assert kind == "node_ref"
    assert ref.node_id == nodes[0]
    assert result.metrics["epoch"] == 2 and result.metrics["world_rank"] == 0
    assert result.metrics["training_iteration"] == 3
    assert result.error is None and result.failures == 0
    assert result.best_checkpoints == manager.registered


def _report_ray_losses():
    # Ray 2.6's test_checkpoints_to_keep: NaN (dropped), 3, 7, 5.
    for i, loss in enumerate([float("nan"), 3, 7, 5]):
        report({"loss": loss}, checkpoint=Checkpoint.from_dict({"idx": i}))


@pytest.mark.parametrize(("mode", "ranked"), [("min", [(3, 5), (1, 3)]),
                                              ("max", [(3, 5), (2, 7)])])
def test_best_checkpoints_are_in_rays_order_worst_first(client, mode, ranked):
    config = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss",
                              checkpoint_score_order=mode, persist_every=0)
    result = fit(_report_ray_losses, num_workers=2, checkpoint_config=config, client=client)
    assert result.checkpoint.to_dict()["idx"] == 3
    assert [(c.to_dict()["idx"], m["loss"]) for c, m in result.best_checkpoints] == ranked
    assert result.get_best_checkpoint("loss", mode).to_dict()["idx"] == ranked[-1][0]


def _report_resume_point():
    checkpoint = get_checkpoint()
    report({"resumed_from": None if checkpoint is None else checkpoint.to_dict()["epoch"]})


def test_get_checkpoint_returns_resume_from_checkpoint(client):
    result = fit(_report_resume_point, num_workers=2, client=client,
                 checkpoint_manager=FakeManager(),
                 resume_from_checkpoint=Checkpoint.from_dict({"epoch": 5}))
    assert [e["resumed_from"] for e in result.metrics_history] == [5, 5]


def _fail_on_rank_1():
    if get_context().world_rank == 1:
        raise ValueError("rank 1 always fails")
    report({"ok": True})


def test_more_failures_than_max_failures_raise_with_the_result(client):
    with pytest.raises(TrainingFailedError, match="failed 2 time.*max_failures=1") as info:
        fit(_fail_on_rank_1, num_workers=2, max_failures=1, client=client,
            checkpoint_manager=FakeManager())
    result = info.value.result
    assert isinstance(result.error, ValueError) and info.value.__cause__ is result.error
    assert result.failures == 2
    assert {e["attempt"] for e in result.metrics_history} <= {0, 1}


def _wait_for_a_peer_that_fails(config):
    """Rank 1 fails at once; rank 0 waits for it in the demo's all-reduce, then says
    how its wait ended in the Variable ``config["ended"]``."""
    from dckpt.demo._toy import all_reduce_mean

    if get_context().world_rank == 1:
        raise ValueError("rank 1 fails before its first all-reduce")
    try:
        all_reduce_mean([1.0], "never-complete")
    except BaseException as e:
        distributed.Variable(config["ended"]).set(type(e).__name__)
        raise


def test_a_rank_waiting_for_its_peers_stops_with_its_attempt(client):
    """No timeout in the wait (a slow peer on a busy machine is waited for): the stop
    the driver sends when the attempt fails ends it (dckpt.train.stop_requested)."""
    ended = f"ended-{uuid.uuid4().hex}"
    with pytest.raises(TrainingFailedError, match="rank 1 fails"):
        fit(_wait_for_a_peer_that_fails, train_loop_config={"ended": ended}, num_workers=2,
            max_failures=0, client=client, checkpoint_manager=FakeManager())
    variable = distributed.Variable(ended, client=client)
    assert variable.get(timeout=60) == "AttemptStopped"
    variable.delete()


def test_too_few_workers_fail_after_the_wait(client):
    with dask.config.set({"dckpt.train.worker-wait-timeout": "200ms"}), \
            pytest.raises(TrainingFailedError, match=f"{N_NODES + 1} workers") as info:
        fit(_report_resume_point, num_workers=N_NODES + 1, client=client,
            checkpoint_manager=FakeManager())
    assert isinstance(info.value.result.error, TimeoutError)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_torch_setup_without_torch_says_so(client):
    with pytest.raises(ImportError, match="needs PyTorch on every worker"):
        fit(_report_resume_point, num_workers=2, client=client,
            checkpoint_manager=FakeManager(), setup_torch_distributed=True)


def _all_reduce_ranks():
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(get_context().world_rank)])
    dist.all_reduce(tensor)
    report({"sum": float(tensor.item()), "world_size": int(os.environ["WORLD_SIZE"])})


def test_torch_distributed_gloo_across_ranks(client):
    # No importorskip: torch==2.13.0 is a test dependency, so CI runs this.
    result = fit(_all_reduce_ranks, num_workers=2, client=client,
                 checkpoint_manager=FakeManager(), setup_torch_distributed=True)
    assert [(e["sum"], e["world_size"]) for e in result.metrics_history] == [(1.0, 2)] * 2


def test_resume_after_killing_a_worker_continues_from_the_latest_checkpoint(
    client, train_cluster
):
    epochs, pause_at = 6, 3
    with node_1_killed_at(train_cluster, client, pause_at - 1) as (event, manager):
        result = DataParallelTrainer(
            _train, train_loop_config={"epochs": epochs, "pause_at": pause_at, "event": event},
            num_workers=N_NODES, checkpoint_manager=manager, max_failures=1, client=client,
        ).fit()
    assert result.failures == 1

    latest_before = max(m["epoch"] for _, m in manager.registered if m["attempt"] == 0)
    assert latest_before >= pause_at - 1
    after = [e for e in result.metrics_history if e["attempt"] == 1]
    # Every rank of the new attempt, on every node, resumed from that checkpoint ...
    assert {(e["world_rank"], e["resumed_from"]) for e in after} == {
        (rank, latest_before) for rank in range(N_NODES)
    }
    # ... and the epochs went on from there, not from 0.
    for rank in range(N_NODES):
        assert [e["epoch"] for e in after if e["world_rank"] == rank] == list(
            range(latest_before + 1, epochs)
        )
    assert result.metrics["epoch"] == epochs - 1 and result.metrics["attempt"] == 1
    assert result.checkpoint is manager.registered[-1][0]


def _exists_here(path: str) -> bool:
    return os.path.exists(path)


def test_with_the_real_manager_a_new_driver_continues_from_storage(client, tmp_path):
    """Top 2 by loss persisted to a URI; a new driver restores the manager from there
    and the next fit resumes from the latest checkpoint."""
    uri = f"file://{tmp_path}/run"
    config = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss",
                              checkpoint_score_order="min", storage_uri=uri)
    first = DataParallelTrainer(_train, train_loop_config={"epochs": 3}, num_workers=2,
                                checkpoint_config=config, client=client).fit()
    # The trainer closed the manager it made: every upload and deletion is done.
    assert sorted(os.listdir(tmp_path / "run")) == [
        "checkpoint_000001", "checkpoint_000002", "dckpt_manager_state.json"]
    assert [m["epoch"] for _, m in first.best_checkpoints] == [1, 2]  # worst first
    # Epoch 0's checkpoint fell out of the top 2: gone from the node that wrote it too.
    dropped = [e for e in first.metrics_history if e["world_rank"] == 0 and e["epoch"] == 0]
    assert dropped and dropped[0]["node_id"] == "node-0"

    restored = CheckpointManager.restore(uri, client=client)
    try:
        assert [m["epoch"] for _, m in restored.best_checkpoints] == [1, 2]
        second = DataParallelTrainer(_train, train_loop_config={"epochs": 5}, num_workers=2,
                                     checkpoint_manager=restored, client=client).fit()
    finally:
        restored.close()
    assert {e["resumed_from"] for e in second.metrics_history} == {2}
    assert sorted({e["epoch"] for e in second.metrics_history}) == [3, 4]
    assert [m["epoch"] for _, m in restored.best_checkpoints] == [3, 4]


def _weights(epoch: int) -> bytes:
    return bytes(range(256)) * 40 + bytes([epoch]) * 1000


def _save_weights(config):
    """Rank 0 writes a directory checkpoint of its own bytes each epoch, on its node."""
    context = get_context()
    for epoch in range(config["epochs"]):
        checkpoint = None
        if context.world_rank == 0:
            path = os.path.join(_node.node_root(), "train-tests", context.run_name,
                                f"weights-{epoch}")
            os.makedirs(path)
            with open(os.path.join(path, "weights.bin"), "wb") as f:
                f.write(_weights(epoch))
            checkpoint = Checkpoint.from_directory(path)
        report({"epoch": epoch}, checkpoint=checkpoint)


def test_the_default_storage_is_the_drivers_disk_and_the_driver_writes_it(
    client, train_cluster
):
    # The driver's temporary directory, and so the default storage_uri, is put at the
    # nodes' mount point: every node has that path too, but with its own disk behind
    # it, as /tmp on the driver's machine and on a worker's are two different disks.
    # A worker that wrote "the default storage" there would write its own disk.
    driver_tmp = os.path.join(train_cluster.nodes[0].root, f"driver-{uuid.uuid4().hex[:8]}")
    try:
        with dask.config.set({"dckpt.temporary-directory": driver_tmp}):
            result = DataParallelTrainer(
                _save_weights, train_loop_config={"epochs": 3}, num_workers=2,
                checkpoint_config=CheckpointConfig(num_to_keep=2), client=client,
            ).fit()
            folder = os.path.join(driver_tmp, "dckpt-train", result.run_name)
            assert sorted(os.listdir(folder)) == [
                "checkpoint_000001", "checkpoint_000002", "dckpt_manager_state.json"]
            for epoch in (1, 2):
                persisted = Checkpoint.from_uri(f"file://{folder}/checkpoint_{epoch:06d}")
                with persisted.as_directory() as path, \
                        open(os.path.join(path, "weights.bin"), "rb") as f:
                    assert f.read() == _weights(epoch)
            # Fetched by the driver's store, which keeps no second copy of what it persisted.
            driver = driver_store().stats()
            assert driver["transfers"] >= 2 and driver["cache"]["entries"] == 0, driver
            # The Result's checkpoints fall back to the persisted copies.
            kind, ref = result.checkpoint.get_internal_representation()
            assert kind == "node_ref" and ref.uris == (f"{folder}/checkpoint_000002",)
    finally:
        shutil.rmtree(driver_tmp, ignore_errors=True)


def test_data_parallel_example_resumes_after_the_kill():
    pytest.importorskip("dckpt.train._manager", reason="needs the CheckpointManager (merged later)")
    if not isolation_available():
        pytest.skip("the example runs an isolated NodeCluster")
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                           "train_data_parallel.py")
    result = subprocess.run([sys.executable, example], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "resumed from the checkpoint of epoch" in result.stdout
    assert "the curve continues" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)  # 4 processes import torch: slow on a loaded 2-core machine
def test_torch_ddp_example_resumes_after_the_kill():
    if not isolation_available():
        pytest.skip("the example runs an isolated NodeCluster")
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                           "train_torch_ddp.py")
    try:  # inside the test's timeout, so that a run that hangs shows how far it got
        result = subprocess.run([sys.executable, example], capture_output=True, text=True,
                                timeout=280, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the example did not finish in {e.timeout} s; it said:\n{e.stdout}\n"
                    f"{e.stderr}")
    assert result.returncode == 0, result.stderr
    assert "-- killing node-1 (rank 1) after epoch 8 --" in result.stdout
    assert "resumed from the checkpoint of epoch 8, continuing at epoch 9" in result.stdout
    # The loss went on from where it was: a restart from scratch would jump back up.
    match = re.search(r"last before the failure ([\d.]+); first after the resume ([\d.]+)",
                      result.stdout)
    assert match, result.stdout
    assert float(match[2]) < float(match[1])
