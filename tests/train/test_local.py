"""DataParallelTrainer.fit() with no Dask client: a local cluster of the run's own,
closed afterwards, and a Result whose checkpoints outlive it."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator

import dask.config
import distributed
import pytest

from dckpt import Checkpoint
from dckpt.train import CheckpointConfig, TrainingFailedError, fit, get_context, report

pytestmark = pytest.mark.slow


def _has_default_client() -> bool:
    try:
        distributed.default_client()
    except ValueError:
        return False
    return True


class _Records(logging.Handler):
    """Keeps what the ``dckpt`` loggers say. Not pytest's caplog: a LocalCluster turns
    the StreamHandlers it finds on distributed's logger, caplog's among them, down to
    WARNING while it runs (``silence_logs``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def said(self, text: str) -> bool:
        return any(text in r.getMessage() and r.levelno == logging.INFO for r in self.records)


@pytest.fixture
def no_client(tmp_path) -> Iterator[_Records]:
    """No Dask client in this process, before and after; no worker process left after.

    The driver's temporary directory (the default storage_uri's parent) is tmp_path.
    Yields what the dckpt loggers said at INFO.
    """
    assert not _has_default_client(), (
        "a default Dask client leaked from an earlier test; this test is about fit() "
        "without one")
    children = set(multiprocessing.active_children())
    logger = logging.getLogger("dckpt")
    records, level = _Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        with dask.config.set({"dckpt.temporary-directory": str(tmp_path)}):
            yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert not _has_default_client()  # fit() left no client behind ...
    assert set(multiprocessing.active_children()) <= children  # ... nor a worker process


def _train_in_scratch(config):
    """Rank 0 checkpoints into its worker's scratch folder, which goes with the worker."""
    context = get_context()
    for epoch in range(config["epochs"]):
        checkpoint = None
        if context.world_rank == 0:
            path = os.path.join(distributed.get_worker().local_directory, f"ckpt-{epoch}")
            os.makedirs(path)
            with open(os.path.join(path, "weights.bin"), "wb") as f:
                f.write(bytes([epoch]) * 3000)
            checkpoint = Checkpoint.from_directory(path)
        report({"epoch": epoch, "loss": 1.0 / (epoch + 1), "path": path if checkpoint else None},
               checkpoint=checkpoint)
        # Rank 0 alone fails, after queueing its report: the driver drains the queue
        # once it sees the failure, so that checkpoint is the latest. (Were rank 1 to
        # fail too, it might fail before rank 0 reported.)
        if epoch == config.get("fail_after") and context.world_rank == 0:
            raise ValueError(f"rank {context.world_rank} fails after epoch {epoch}")


def _weights(checkpoint: Checkpoint) -> bytes:
    with checkpoint.as_directory() as path, open(os.path.join(path, "weights.bin"), "rb") as f:
        return f.read()


def test_without_a_client_fit_starts_a_local_cluster_and_closes_it(no_client, tmp_path):
    config = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="loss",
                              checkpoint_score_order="min")
    result = fit(_train_in_scratch, train_loop_config={"epochs": 3}, num_workers=2,
                 checkpoint_config=config)

    assert no_client.said("no Dask client, so starting a local cluster of 2 worker processes")
    assert no_client.said("closing its local cluster")
    assert sorted({e["world_rank"] for e in result.metrics_history}) == [0, 1]
    written = [e["path"] for e in result.metrics_history if e["path"]]
    assert written and not any(os.path.exists(p) for p in written)  # gone with the workers
    # The cluster is gone, yet every checkpoint reads back: each is the persisted copy
    # in the default storage, on this machine's disk.
    folder = tmp_path / "dckpt-train" / result.run_name
    assert result.checkpoint.get_internal_representation() == (
        "local_path", str(folder / "checkpoint_000002"))
    assert _weights(result.checkpoint) == bytes([2]) * 3000
    assert [(_weights(c), m["epoch"]) for c, m in result.best_checkpoints] == [
        (bytes([1]) * 3000, 1), (bytes([2]) * 3000, 2)]
    assert result.best_checkpoints[-1][0] is result.checkpoint


def test_a_failed_run_closes_its_local_cluster_too(no_client):
    with pytest.raises(TrainingFailedError, match="failed 1 time") as info:
        fit(_train_in_scratch, train_loop_config={"epochs": 3, "fail_after": 1},
            num_workers=2, checkpoint_config=CheckpointConfig(persist_every=0))
    assert no_client.said("closing its local cluster")
    # Nothing was persisted: the latest checkpoint was copied to this machine instead.
    result = info.value.result
    kind, path = result.checkpoint.get_internal_representation()
    assert kind == "local_path" and os.path.isdir(path)
    assert _weights(result.checkpoint) == bytes([1]) * 3000
