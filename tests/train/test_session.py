"""The session API, the rank task and placement, without a cluster."""

from __future__ import annotations

import importlib.util

import pytest

from dckpt import Checkpoint
from dckpt.train import (
    Result,
    TrainContext,
    get_checkpoint,
    get_context,
    report,
    stop_requested,
)
from dckpt.train._placement import place
from dckpt.train._rank import RankSpec, run_rank
from dckpt.train._session import RankStopped, Report, session


class RecordingSender:
    """A session's channel that keeps what is sent; ``stop`` stops the rank."""

    def __init__(self) -> None:
        self.reports: list[Report] = []
        self.stop = False

    def send(self, report: Report) -> None:
        self.reports.append(report)

    def stop_requested(self) -> bool:
        return self.stop


def _context(rank: int = 0) -> TrainContext:
    return TrainContext(world_rank=rank, world_size=2, local_rank=0, local_world_size=1,
                        node_rank=rank, node_id=f"node-{rank}", run_name="run", attempt=0)


@pytest.mark.parametrize("call", [
    lambda: report({"loss": 1.0}), get_checkpoint, get_context, stop_requested,
], ids=["report", "get_checkpoint", "get_context", "stop_requested"])
def test_session_functions_outside_a_trainer_raise(call):
    with pytest.raises(RuntimeError, match="only inside a training function run by"):
        call()


def test_report_sends_metrics_and_rank_0s_checkpoint():
    sender = RecordingSender()
    resume = Checkpoint.from_dict({"epoch": 1})
    checkpoint = Checkpoint.from_dict({"epoch": 2})
    with session(_context(0), resume, sender):
        assert get_checkpoint() is resume
        assert get_context().world_rank == 0
        metrics = {"loss": 0.5}
        report(metrics, checkpoint=checkpoint)
        metrics["loss"] = 9.0  # the report took a copy
    (sent,) = sender.reports
    assert (sent.world_rank, sent.attempt, sent.metrics) == (0, 0, {"loss": 0.5})
    assert sent.checkpoint is checkpoint


def test_other_ranks_checkpoints_are_dropped_but_their_metrics_sent():
    sender = RecordingSender()
    with session(_context(1), None, sender):
        report({"loss": 0.5}, checkpoint=Checkpoint.from_dict({"epoch": 2}))
    (sent,) = sender.reports
    assert sent.metrics == {"loss": 0.5} and sent.checkpoint is None


def test_stop_requested_tells_what_the_driver_said():
    sender = RecordingSender()
    with session(_context(0), None, sender):
        assert stop_requested() is False
        sender.stop = True
        assert stop_requested() is True


def test_report_checks_its_arguments():
    with session(_context(), None, RecordingSender()):
        with pytest.raises(TypeError, match="mapping of metrics"):
            report([("loss", 1.0)])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="dckpt.Checkpoint"):
            report({}, checkpoint={"epoch": 1})  # type: ignore[arg-type]


def test_the_session_ends_with_its_block():
    with session(_context(), None, RecordingSender()):
        pass
    with pytest.raises(RuntimeError):
        get_context()


def _spec(train_loop, sender, config=None) -> RankSpec:
    (placement,) = place(1, {"tcp://w0": "node-0"})
    return RankSpec(train_loop=train_loop, config=config, placement=placement, world_size=1,
                    run_name="run", attempt=0, checkpoint=None, channel=sender,
                    torch_master=None)


def test_run_rank_passes_a_copy_of_the_config_or_nothing():
    seen = []
    config = {"lr": 0.1}
    assert run_rank(_spec(lambda c: seen.append(c), RecordingSender(), config)) == "finished"
    assert run_rank(_spec(lambda: seen.append("no arguments"), RecordingSender())) == "finished"
    assert seen == [config, "no arguments"] and seen[0] is not config


def test_a_stopped_rank_unwinds_through_except_exception():
    sender = RecordingSender()

    def train():
        report({"step": 0})
        sender.stop = True
        try:
            report({"step": 1})
        except Exception:  # noqa: BLE001 - user code that must not swallow the stop
            pytest.fail("RankStopped was caught by except Exception")

    assert not issubclass(RankStopped, Exception)
    assert run_rank(_spec(train, sender)) == "stopped"
    assert [r.metrics for r in sender.reports] == [{"step": 0}]


def test_ranks_go_round_robin_over_nodes_with_local_ranks():
    workers = {"tcp://a1": "node-a", "tcp://a2": "node-a", "tcp://b1": "node-b",
               "tcp://c1": "node-c"}
    placements = place(4, workers)
    assert [(p.worker, p.node_id) for p in placements] == [
        ("tcp://a1", "node-a"), ("tcp://b1", "node-b"), ("tcp://c1", "node-c"),
        ("tcp://a2", "node-a"),
    ]
    assert [p.local_rank for p in placements] == [0, 0, 0, 1]
    assert [p.local_world_size for p in placements] == [2, 1, 1, 2]
    assert [p.node_rank for p in placements] == [0, 1, 2, 0]
    assert [p.world_rank for p in placements] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="5 ranks need 5 workers; 4 are alive"):
        place(5, workers)


def test_result_metrics_dataframe():
    result = Result(metrics={"loss": 1.0}, checkpoint=None,
                    metrics_history=[{"loss": 2.0}, {"loss": 1.0}])
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="metrics_history holds the same rows"):
            result.metrics_dataframe  # noqa: B018
    else:
        assert list(result.metrics_dataframe["loss"]) == [2.0, 1.0]
