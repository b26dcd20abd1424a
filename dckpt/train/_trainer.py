"""``DataParallelTrainer``: run a training function on N workers, keep its checkpoints,
restart it from the latest one when a rank fails.

Driver side. One attempt at a time: seat the ranks (:mod:`dckpt.train._placement`),
start them (:class:`~dckpt.train._group.RankGroup`), then poll every
``dckpt.train.poll-interval`` for reports (:class:`~dckpt.train._channel.ReportChannel`),
finished ranks, failed ranks and lost workers, in the thread that called
:meth:`DataParallelTrainer.fit`. Rank 0's checkpoints go to the checkpoint manager as
they arrive; after a failure the next attempt resumes from its latest one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import dask.config
import distributed
from dask.utils import parse_timedelta

from dckpt._checkpoint import Checkpoint
from dckpt.cluster import install, worker_nodes
from dckpt.errors import TrainingFailedError
from dckpt.train import _default_cluster, _torch_distributed
from dckpt.train._channel import ReportChannel
from dckpt.train._datasets import ShardArgument, dataset_kind, shard_datasets
from dckpt.train._group import RankGroup
from dckpt.train._placement import place
from dckpt.train._rank import RankSpec
from dckpt.train._result import Result
from dckpt.train._run_config import RunConfig, ScalingConfig, resolve
from dckpt.train._session import Report

if TYPE_CHECKING:
    from dckpt.train._run_config import CheckpointConfig

logger = logging.getLogger(__name__)

__all__ = ["CheckpointManagerLike", "DataParallelTrainer", "fit"]


class CheckpointManagerLike(Protocol):
    """What the trainer uses of a ``CheckpointManager``."""

    def register(self, checkpoint: Checkpoint, metrics: Mapping[str, Any]) -> Any: ...

    @property
    def latest_checkpoint(self) -> Checkpoint | None: ...

    @property
    def best_checkpoints(self) -> list[tuple[Checkpoint, dict[str, Any]]]: ...

    def close(self) -> None: ...


@dataclass
class _History:
    """What the driver has received in a run."""

    metrics: dict[str, Any] | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    iterations: dict[int, int] = field(default_factory=dict)


class DataParallelTrainer:
    """Run ``train_loop_per_worker`` on ``num_workers`` Dask workers at once.

    Ray's ``DataParallelTrainer`` on Dask: each rank is a task on a worker of its own,
    spread round-robin across nodes; inside, :func:`dckpt.train.report`,
    :func:`~dckpt.train.get_checkpoint` and :func:`~dckpt.train.get_context` talk to
    this trainer.

    Ray AIR's keywords (``scaling_config=``, ``run_config=``) and the flat ones
    (``num_workers=``, ``max_failures=``, ``checkpoint_config=``, ``run_name=``) say
    the same things; either works, and both may be given when they agree. When they
    disagree, ``ValueError`` says which two.

    Parameters
    ----------
    train_loop_per_worker
        ``f(config)`` or ``f()``, run once per rank. Its return value is ignored.
    train_loop_config
        The ``config`` passed to every rank (a copy; ``{}`` when None).
    scaling_config
        :class:`~dckpt.train.ScalingConfig`: how many ranks, and the resources each
        needs (mapped to Dask worker threads and resources, see
        :mod:`dckpt.train._run_config`).
    run_config
        :class:`~dckpt.train.RunConfig`: the run's name, ``storage_path`` (the
        checkpoints go to ``{storage_path}/{name}``), checkpoint and failure configs.
    datasets
        ``{name: dask DataFrame or Bag}``: each is computed on the cluster once per
        run and its partitions dealt out to the ranks in contiguous runs, rank 0
        first, as Ray splits a dataset; a rank reads its shard with
        :func:`~dckpt.train.get_dataset_shard` (see :mod:`dckpt.train._datasets`).
    num_workers
        How many ranks, each on a worker of its own; default 2.
    checkpoint_config
        How the manager that the trainer creates keeps and persists checkpoints.
    checkpoint_manager
        A manager to use instead of creating one (then ``checkpoint_config`` must be
        None). The trainer closes only a manager it created. When the manager
        already holds a checkpoint (one restored after a driver restart, say), the
        first attempt resumes from its latest.
    max_failures
        How many times the ranks are restarted after a failure; -1 for no limit;
        default 0.
    resume_from_checkpoint
        What :func:`~dckpt.train.get_checkpoint` returns on the first attempt, and on
        later ones until rank 0 has registered a checkpoint.
    client
        The client of the cluster; default: the default client, and without one a
        local cluster of the run's own (see :meth:`fit`).
    setup_torch_distributed
        Set up ``torch.distributed`` with gloo in every rank before calling the
        function (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
        ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``; the master is rank 0's host, at a port
        free there), and destroy the process group after it.
    run_name
        The run's name (:attr:`TrainContext.run_name`, the manager's ``run_name``);
        default ``train-<date>-<time>-<random>``.

    Notes
    -----
    **Failures.** When a rank raises, or the worker of an unfinished rank leaves the
    cluster (checked every ``dckpt.train.poll-interval``), the attempt is over: its
    ranks are told to stop at their next report and their tasks are cancelled, and a
    new attempt starts every rank again, on the workers alive, with
    :func:`~dckpt.train.get_checkpoint` returning the manager's latest checkpoint.
    The data of that checkpoint are fetched lazily on the node where each rank lands,
    from the node that wrote it or from storage. Reports of an attempt that arrive
    after it is over are dropped.

    **Too few workers.** Ranks start only when at least ``num_workers`` workers are
    alive; the trainer waits up to ``dckpt.train.worker-wait-timeout`` for them (for
    a restarted or replacement node to join, say), then fails with
    :class:`TrainingFailedError`. That ends the run whatever ``max_failures`` says:
    waiting again would only repeat the same wait.

    **Outcome.** As in Ray 2.6, :meth:`fit` raises :class:`TrainingFailedError`
    when the ranks failed more than ``max_failures`` times; the error's ``result`` is
    the :class:`Result` with ``error`` set, so the history and the latest checkpoint
    are not lost. Errors of the driver's own making (a manager that refuses a
    checkpoint, bad arguments, PyTorch missing) propagate as they are.
    """

    def __init__(
        self,
        train_loop_per_worker: Callable[..., Any],
        *,
        train_loop_config: Mapping[str, Any] | None = None,
        scaling_config: ScalingConfig | None = None,
        run_config: RunConfig | None = None,
        datasets: Mapping[str, Any] | None = None,
        num_workers: int | None = None,
        checkpoint_config: CheckpointConfig | None = None,
        checkpoint_manager: CheckpointManagerLike | None = None,
        max_failures: int | None = None,
        resume_from_checkpoint: Checkpoint | None = None,
        client: distributed.Client | None = None,
        setup_torch_distributed: bool = False,
        run_name: str | None = None,
    ) -> None:
        if not callable(train_loop_per_worker):
            raise TypeError(f"train_loop_per_worker must be callable, got {train_loop_per_worker!r}")
        if datasets is not None:
            if not isinstance(datasets, Mapping):
                raise TypeError("datasets must be a mapping of names to dask collections, "
                                f"not {type(datasets).__name__}")
            for collection in datasets.values():
                dataset_kind(collection)  # a TypeError for what cannot be sharded
        settings = resolve(scaling_config, run_config, num_workers=num_workers,
                             max_failures=max_failures, checkpoint_config=checkpoint_config,
                             run_name=run_name)
        num_workers, max_failures = settings.num_workers, settings.max_failures
        checkpoint_config, run_name = settings.checkpoint_config, settings.run_name
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if max_failures < -1:
            raise ValueError(f"max_failures must be -1 (no limit) or at least 0, got {max_failures}")
        if checkpoint_manager is not None and checkpoint_config is not None:
            raise ValueError(
                "pass checkpoint_config (or run_config with a checkpoint_config or a "
                "storage_path) or checkpoint_manager, not both: an injected manager "
                "brings its own configuration"
            )
        self.train_loop_per_worker = train_loop_per_worker
        self.train_loop_config = dict(train_loop_config) if train_loop_config is not None else None
        self.num_workers = num_workers
        self.scaling_config = settings.scaling_config
        self.checkpoint_config = checkpoint_config
        self.checkpoint_manager = checkpoint_manager
        self.max_failures = max_failures
        self.resume_from_checkpoint = resume_from_checkpoint
        self.client = client
        self.setup_torch_distributed = setup_torch_distributed
        self.run_name = run_name
        self.datasets = dict(datasets) if datasets else None

    def fit(self) -> Result:
        """Run the training function on the ranks until every rank has returned.

        Without ``client`` and without a default Dask client, the run gets a local
        cluster of its own, as Ray starts a local runtime: ``num_workers`` worker
        processes on this machine (``distributed.LocalCluster``), started and closed
        by this call, also when it raises (both logged at INFO under ``dckpt``). The
        checkpoints of the :class:`Result` then outlive that cluster: each is a
        directory on this machine, the persisted copy at the run's ``storage_uri``
        when that is local (as by default), else a copy made with
        :meth:`Checkpoint.to_directory` (see :mod:`dckpt.train._default_cluster`); an injected
        ``checkpoint_manager`` is waited for (``wait()``) before the cluster closes.

        Returns
        -------
        Result
            Rank 0's last metrics, the latest and best checkpoints, every report.

        Raises
        ------
        TrainingFailedError
            When the ranks failed more than ``max_failures`` times, or fewer than
            ``num_workers`` workers were alive for ``dckpt.train.worker-wait-timeout``.
        """
        client = self.client or _default_client()
        if client is not None:
            return self._fit(client, own_cluster=False)
        with _default_cluster.local_cluster(self.num_workers, self.run_name) as client:
            return self._fit(client, own_cluster=True)

    # ------------------------------------------------------------------ internals

    def _fit(self, client: distributed.Client, own_cluster: bool) -> Result:
        install(client)  # idempotent; ranks need their node's store to report checkpoints
        manager, owned = self._manager(client)
        channel = ReportChannel(client)
        failure: TrainingFailedError | None = None
        shards: list[ShardArgument] | None = None
        held: list[distributed.Future] = []
        try:
            try:
                if self.datasets:  # in the try: the channel and manager close whatever happens
                    shards, held = shard_datasets(client, self.datasets, self.num_workers)
                result = self._run(client, manager, channel, shards)
            except TrainingFailedError as e:
                failure, result = e, e.result
        finally:
            for future in held:
                future.release()
            channel.close()
            if owned:
                manager.close()
            elif own_cluster and callable(getattr(manager, "wait", None)):
                # The cluster goes next: its nodes must finish their uploads first.
                manager.wait()  # type: ignore[attr-defined]
        # The manager's checkpoints as they are now: persisted ones carry their URI.
        result = dataclasses.replace(result, checkpoint=manager.latest_checkpoint,
                                     best_checkpoints=list(manager.best_checkpoints))
        if own_cluster:
            result = _default_cluster.without_cluster(result, client)
        if failure is not None:
            failure.result = result
            raise failure
        return result

    def _manager(self, client: distributed.Client) -> tuple[CheckpointManagerLike, bool]:
        if self.checkpoint_manager is not None:
            return self.checkpoint_manager, False
        from dckpt.train._manager import CheckpointManager

        manager = CheckpointManager(self.checkpoint_config, run_name=self.run_name, client=client)
        return manager, True

    def _run(
        self, client: distributed.Client, manager: CheckpointManagerLike, channel: ReportChannel,
        shards: list[ShardArgument] | None = None,
    ) -> Result:
        history = _History()
        failures = 0
        attempt = 0
        while True:
            try:
                workers = _wait_for_workers(client, self.num_workers, self.scaling_config)
            except TimeoutError as e:
                result = self._result(manager, history, failures, e)
                raise TrainingFailedError(f"training run {self.run_name!r} could not start its "
                                          f"ranks: {e}", result) from e
            error = self._attempt(client, manager, channel, history, attempt, workers, shards)
            if error is None:
                return self._result(manager, history, failures, None)
            failures += 1
            if 0 <= self.max_failures < failures:
                result = self._result(manager, history, failures, error)
                raise TrainingFailedError(
                    f"training run {self.run_name!r} failed {failures} time(s), more than "
                    f"max_failures={self.max_failures}; the last failure: {error!r}. To go on "
                    "from where it got to, start a new run with "
                    "resume_from_checkpoint=error.result.checkpoint", result,
                ) from error
            logger.warning("Training run %r: attempt %d failed (%r); restarting %d ranks "
                           "(failure %d of %s)", self.run_name, attempt, error,
                           self.num_workers, failures,
                           "unlimited" if self.max_failures < 0 else self.max_failures)
            attempt += 1

    def _attempt(
        self,
        client: distributed.Client,
        manager: CheckpointManagerLike,
        channel: ReportChannel,
        history: _History,
        attempt: int,
        workers: Mapping[str, str],
        shards: list[ShardArgument] | None = None,
    ) -> BaseException | None:
        """Run one attempt to its end; returns why it failed, or None."""
        placements = place(self.num_workers, workers)
        latest = manager.latest_checkpoint
        checkpoint = latest if latest is not None else self.resume_from_checkpoint
        master = (_torch_distributed.master_address(client, placements[0].worker)
                  if self.setup_torch_distributed else None)
        logger.info("Training run %r: attempt %d on %s, resuming from %r", self.run_name,
                    attempt, [p.node_id for p in placements], checkpoint)
        specs = [
            RankSpec(
                train_loop=self.train_loop_per_worker, config=self.train_loop_config,
                placement=placement, world_size=self.num_workers, run_name=self.run_name,
                attempt=attempt, checkpoint=checkpoint,
                channel=channel.for_attempt(attempt), torch_master=master,
            )
            for placement in placements
        ]
        group = RankGroup(client, specs, resources=self.scaling_config.dask_resources,
                          datasets=shards)
        interval = parse_timedelta(dask.config.get("dckpt.train.poll-interval"), default="s")
        try:
            while True:
                self._collect(channel.receive(), attempt, manager, history)
                if group.done():
                    # A rank queues its last report before its task finishes.
                    self._collect(channel.receive(), attempt, manager, history)
                    return None
                error = group.failure()
                if error is not None:
                    break
                time.sleep(interval)
        except BaseException:
            channel.stop(attempt)
            group.cancel()
            raise
        channel.stop(attempt)
        group.cancel()
        # Reports the healthy ranks queued before the failure was seen still count.
        self._collect(channel.receive(), attempt, manager, history)
        return error

    def _collect(
        self, reports: list[Report], attempt: int, manager: CheckpointManagerLike,
        history: _History,
    ) -> None:
        for report in reports:
            if report.attempt != attempt:
                logger.debug("Dropping a report of rank %d of attempt %d, which is over",
                             report.world_rank, report.attempt)
                continue
            rank = report.world_rank
            history.iterations[rank] = history.iterations.get(rank, 0) + 1
            entry = dict(report.metrics)
            for key, value in (("world_rank", rank), ("attempt", attempt),
                               ("training_iteration", history.iterations[rank]),
                               ("timestamp", report.timestamp)):
                entry.setdefault(key, value)
            history.entries.append(entry)
            if rank == 0:
                history.metrics = entry
                if report.checkpoint is not None:
                    manager.register(report.checkpoint, entry)

    def _result(
        self, manager: CheckpointManagerLike, history: _History, failures: int,
        error: BaseException | None,
    ) -> Result:
        return Result(
            metrics=history.metrics, checkpoint=manager.latest_checkpoint,
            best_checkpoints=list(manager.best_checkpoints),
            metrics_history=history.entries, error=error, run_name=self.run_name,
            failures=failures,
        )


def _default_client() -> distributed.Client | None:
    """The client ``distributed.get_client()`` gives (the default one, or a worker's
    inside a task), or None when there is none."""
    try:
        return distributed.get_client()
    except ValueError:  # "No global client found and no address provided"
        return None


def _wait_for_workers(
    client: distributed.Client, count: int, scaling: ScalingConfig | None = None
) -> dict[str, str]:
    """``{address: node id}`` of the workers alive that can run a rank (enough
    threads and Dask resources for ``scaling``), once there are at least ``count``.

    Raises ``TimeoutError`` after ``dckpt.train.worker-wait-timeout``.
    """
    scaling = scaling or ScalingConfig()
    setting = "dckpt.train.worker-wait-timeout"
    interval = parse_timedelta(dask.config.get("dckpt.train.poll-interval"), default="s")
    try:
        return worker_nodes(client, count, timeout=dask.config.get(setting), setting=setting,
                            nthreads=scaling.num_cpus_per_worker,
                            resources=scaling.dask_resources, interval=interval)
    except TimeoutError as e:
        raise TimeoutError(f"{count} ranks need {count} workers{_needs(scaling)}, but {e}") from e


def _needs(scaling: ScalingConfig) -> str:
    needs = [f"{scaling.num_cpus_per_worker:g} threads"] if scaling.num_cpus_per_worker > 1 else []
    needs += [f"{name}={amount:g}" for name, amount in sorted(scaling.dask_resources.items())]
    return f" with {', '.join(needs)}" if needs else ""


def fit(train_loop_per_worker: Callable[..., Any], **kwargs: Any) -> Result:
    """``DataParallelTrainer(train_loop_per_worker, **kwargs).fit()``.

    >>> result = fit(train, num_workers=2, max_failures=1)  # doctest: +SKIP
    """
    return DataParallelTrainer(train_loop_per_worker, **kwargs).fit()
