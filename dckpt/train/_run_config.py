"""Ray AIR's configs: ``ScalingConfig``, ``RunConfig``, ``FailureConfig`` and
``CheckpointConfig``.

Pure: values checked when made, read by :class:`~dckpt.train.DataParallelTrainer`
(``CheckpointConfig`` by :class:`~dckpt.train.CheckpointManager` too). The fields are those of ``ray.air.config`` in Ray 2.6 that mean something on Dask;
the others are accepted where Ray users pass them routinely and documented as having
no effect here (see each class).

How ``ScalingConfig``'s resources map to Dask:

- ``"CPU"``: a worker qualifies for a rank when it has at least that many threads
  (``nthreads``). Dask workers do not usually declare a ``CPU`` resource, so this is
  not claimed as a Dask resource.
- Every other name (``"GPU"``, custom ones such as ``"TPU"`` or ``"memory-hog"``) is a
  Dask *worker resource*: a rank goes only to a worker started with at least that
  amount (``dask worker --resources "GPU=1"``) and its task claims it
  (``client.submit(..., resources={"GPU": 1})``), so Dask runs nothing else that
  needs it there meanwhile.
- ``use_gpu=True`` asks for ``{"GPU": 1}`` per rank unless ``resources_per_worker``
  names ``"GPU"`` itself, as in Ray.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CheckpointConfig",
    "FailureConfig",
    "RunConfig",
    "ScalingConfig",
    "TrainerSettings",
    "resolve",
]

_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_ORDERS = ("max", "min")


@dataclass(frozen=True)
class CheckpointConfig:
    """How a :class:`~dckpt.train.CheckpointManager` keeps and persists checkpoints.

    The fields of Ray AIR's ``ray.air.config.CheckpointConfig`` (Ray 2.6), plus where and
    how often to persist.

    Parameters
    ----------
    num_to_keep
        How many checkpoints to keep: the best ``num_to_keep`` by score. ``None`` keeps
        all. The latest checkpoint is always kept as well until a newer one is
        registered, so at most ``num_to_keep + 1`` exist at once.
    checkpoint_score_attribute
        The metric to rank checkpoints by. A dotted name reaches into nested dicts:
        ``"val.loss"`` is ``metrics["val"]["loss"]`` (a top-level key that is literally
        ``"val.loss"`` wins). ``None`` ranks by registration: the latest is the best.
    checkpoint_score_order
        ``"max"``: higher scores are better; ``"min"``: lower ones are.
    storage_uri
        Where checkpoints are persisted (``{storage_uri}/checkpoint_{index:06d}``) and
        the manager's state is written (``{storage_uri}/dckpt_manager_state.json``):
        any fsspec URI. ``None`` is the local directory
        ``<dckpt.temporary-directory>/dckpt-train/<run name>`` (see
        :func:`dckpt._config.temporary_directory`) on the driver's disk. Who writes a
        checkpoint that lives on a worker's node: for a remote URI (``s3://...``)
        and for a local path under ``dckpt.shared-paths`` (a file system every
        machine mounts), its own node uploads it, and its bytes never pass through
        the driver; for any other local path (plain or ``file://``, the default
        among them) the driver fetches it from its node and writes it, since that
        path is the driver's disk, which the other machines do not see (as Ray 2.6
        syncs checkpoints to the head node).
    persist_every
        Persist every ``persist_every``-th registered checkpoint (the ones with
        ``(index + 1) % persist_every == 0``); ``1`` persists each, ``0`` none (and
        writes no state file either). Only persisted checkpoints survive a restart
        (:meth:`CheckpointManager.restore`).
    storage_options
        Passed to fsspec for ``storage_uri`` (endpoint, credentials, ...). Never
        written to the manager's state file.
    """

    num_to_keep: int | None = None
    checkpoint_score_attribute: str | None = None
    checkpoint_score_order: Literal["max", "min"] = "max"
    storage_uri: str | None = None
    persist_every: int = 1
    storage_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_to_keep is not None and (
            not _is_int(self.num_to_keep) or self.num_to_keep < 1
        ):
            raise ValueError(
                f"num_to_keep must be None (keep all) or an integer >= 1, not "
                f"{self.num_to_keep!r}"
            )
        if self.checkpoint_score_attribute is not None and (
            not isinstance(self.checkpoint_score_attribute, str)
            or not self.checkpoint_score_attribute
        ):
            raise ValueError(
                "checkpoint_score_attribute must be None (rank by time) or a metric "
                f"name, not {self.checkpoint_score_attribute!r}"
            )
        if self.checkpoint_score_order not in _ORDERS:
            raise ValueError(
                f"checkpoint_score_order must be 'max' or 'min', not "
                f"{self.checkpoint_score_order!r}"
            )
        if self.storage_uri is not None and (
            not isinstance(self.storage_uri, str) or not self.storage_uri
        ):
            raise ValueError(f"storage_uri must be None or a URI, not {self.storage_uri!r}")
        if not _is_int(self.persist_every) or self.persist_every < 0:
            raise ValueError(
                "persist_every must be an integer >= 0 (1 = every checkpoint, 0 = never), "
                f"not {self.persist_every!r}"
            )
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise ValueError(
                f"storage_options must be a mapping or None, not "
                f"{type(self.storage_options).__name__}"
            )

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON data, without ``storage_options`` (they may hold secrets)."""
        return {
            "num_to_keep": self.num_to_keep,
            "checkpoint_score_attribute": self.checkpoint_score_attribute,
            "checkpoint_score_order": self.checkpoint_score_order,
            "storage_uri": self.storage_uri,
            "persist_every": self.persist_every,
        }


@dataclass(frozen=True)
class ScalingConfig:
    """How many ranks a run has and what each needs (Ray AIR's ``ScalingConfig``).

    Parameters
    ----------
    num_workers
        How many ranks (each on a Dask worker of its own). ``None``: the trainer's
        default (2), as Ray leaves it to the trainer.
    use_gpu
        Whether each rank needs a GPU: ``{"GPU": 1}`` per rank, a Dask worker
        resource (see the module notes).
    resources_per_worker
        What each rank needs: ``"CPU"`` is a minimum of worker threads, every other
        key a Dask worker resource that the rank's task claims.
    trainer_resources
        Accepted for Ray's sake and not used: the trainer runs in the driver's
        process here, not in an actor of its own.
    placement_strategy
        ``"PACK"``, ``"SPREAD"``, ``"STRICT_PACK"`` or ``"STRICT_SPREAD"``, checked
        and not used: ranks always go one per worker, round-robin over nodes (the
        spread that survives the loss of a node best; see
        :func:`dckpt.train._placement.place`).
    """

    num_workers: int | None = None
    use_gpu: bool = False
    resources_per_worker: Mapping[str, float] | None = None
    trainer_resources: Mapping[str, float] | None = None
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.num_workers is not None and (
            not _is_int(self.num_workers) or self.num_workers < 1
        ):
            raise ValueError(f"num_workers must be an integer >= 1, not {self.num_workers!r}")
        if not isinstance(self.use_gpu, bool):
            raise TypeError(f"use_gpu must be True or False, not {self.use_gpu!r}")
        for name in ("resources_per_worker", "trainer_resources"):
            resources = getattr(self, name)
            if resources is None:
                continue
            if not isinstance(resources, Mapping):
                raise TypeError(f"{name} must be a mapping of resource name to amount, "
                                f"not {type(resources).__name__}")
            for key, amount in resources.items():
                if not isinstance(key, str) or not isinstance(amount, numbers.Real) \
                        or isinstance(amount, bool) or amount < 0:
                    raise ValueError(f"{name} maps resource names to amounts >= 0; got "
                                     f"{key!r}: {amount!r}")
        if self.placement_strategy not in _STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {list(_STRATEGIES)}, not "
                             f"{self.placement_strategy!r}")

    @property
    def num_cpus_per_worker(self) -> float:
        """Threads a worker needs for a rank: ``resources_per_worker["CPU"]``, else 1."""
        return float((self.resources_per_worker or {}).get("CPU", 1))

    @property
    def dask_resources(self) -> dict[str, float]:
        """The Dask worker resources each rank's task claims (all but ``"CPU"``)."""
        resources = {key: float(amount) for key, amount in
                     (self.resources_per_worker or {}).items() if key != "CPU"}
        if self.use_gpu:
            resources.setdefault("GPU", 1.0)
        return {key: amount for key, amount in resources.items() if amount > 0}


@dataclass(frozen=True)
class FailureConfig:
    """How often a run restarts its ranks after a failure (Ray AIR's ``FailureConfig``).

    Parameters
    ----------
    max_failures
        Restarts allowed; ``-1`` for no limit, ``0`` (the default, as in Ray) for none.
    fail_fast
        Accepted for Ray's sake; only ``False`` (the default) is supported, since
        there are no concurrent trials to stop.
    """

    max_failures: int = 0
    fail_fast: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_failures) or self.max_failures < -1:
            raise ValueError("max_failures must be -1 (no limit) or an integer >= 0, not "
                             f"{self.max_failures!r}")
        if self.fail_fast:
            raise ValueError("FailureConfig(fail_fast=True) stops concurrent Tune trials; "
                             "dckpt runs one training run, so leave it False")


@dataclass(frozen=True)
class RunConfig:
    """Name, storage and policies of a training run (Ray AIR's ``RunConfig``).

    Parameters
    ----------
    name
        The run's name (:func:`dckpt.air.session.get_trial_name`); default
        ``train-<date>-<time>-<random>``.
    storage_path
        Where the run keeps its checkpoints: ``{storage_path}/{name}`` becomes the
        :attr:`CheckpointConfig.storage_uri` (any fsspec URI or local path, ``~``
        expanded), as Ray stores them under ``storage_path/name``. ``None``: the
        checkpoint config's own ``storage_uri``, else the default local folder.
    checkpoint_config
        Which checkpoints to keep (:class:`CheckpointConfig`).
    failure_config
        How often to restart after a failure (:class:`FailureConfig`).
    verbose
        Accepted for Ray's sake (0 to 3) and not used: dckpt reports through the
        ``logging`` loggers under ``dckpt.train``; set their level instead.
    local_dir
        Ray 2.6's older name of ``storage_path`` (deprecated there); the same here.
    """

    name: str | None = None
    storage_path: str | None = None
    checkpoint_config: CheckpointConfig | None = None
    failure_config: FailureConfig | None = None
    verbose: int = 3
    local_dir: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name
                                      or "/" in self.name):
            raise ValueError(f"name must be a non-empty string without '/', not {self.name!r}")
        if self.local_dir is not None:
            if self.storage_path is not None and self.storage_path != self.local_dir:
                raise ValueError(
                    f"RunConfig got storage_path={self.storage_path!r} and "
                    f"local_dir={self.local_dir!r}; local_dir is the old name of "
                    "storage_path, pass one of them"
                )
            object.__setattr__(self, "storage_path", self.local_dir)
        if self.storage_path is not None:
            if not isinstance(self.storage_path, (str, os.PathLike)) or not str(self.storage_path):
                raise ValueError(f"storage_path must be a path or URI, not {self.storage_path!r}")
            object.__setattr__(self, "storage_path", _expanded(os.fspath(self.storage_path)))
        if self.checkpoint_config is not None and not isinstance(
            self.checkpoint_config, CheckpointConfig
        ):
            raise TypeError("checkpoint_config must be a dckpt.air.CheckpointConfig, not "
                            f"{type(self.checkpoint_config).__name__}")
        if self.failure_config is not None and not isinstance(self.failure_config, FailureConfig):
            raise TypeError("failure_config must be a dckpt.air.FailureConfig, not "
                            f"{type(self.failure_config).__name__}")
        if not _is_int(self.verbose) or not 0 <= self.verbose <= 3:
            raise ValueError(f"verbose must be 0, 1, 2 or 3, not {self.verbose!r}")

    def storage_uri_for(self, run_name: str) -> str | None:
        """``{storage_path}/{run_name}``, or None without a ``storage_path``."""
        if self.storage_path is None:
            return None
        return f"{self.storage_path.rstrip('/')}/{run_name}"


@dataclass(frozen=True)
class TrainerSettings:
    """What a trainer runs with, once Ray's configs and the flat keywords are merged."""

    num_workers: int
    max_failures: int
    checkpoint_config: CheckpointConfig | None
    run_name: str
    scaling_config: ScalingConfig


#: The trainer's defaults, where neither form says anything.
DEFAULT_NUM_WORKERS = 2
DEFAULT_MAX_FAILURES = 0


def resolve(
    scaling_config: ScalingConfig | None,
    run_config: RunConfig | None,
    *,
    num_workers: int | None,
    max_failures: int | None,
    checkpoint_config: CheckpointConfig | None,
    run_name: str | None,
) -> TrainerSettings:
    """Merge Ray AIR's ``scaling_config``/``run_config`` with the flat keywords.

    Each setting may come from either; when both give it, they must agree.

    Raises
    ------
    TypeError
        A config of the wrong type.
    ValueError
        The two forms give one setting two values, or ``run_config.storage_path``
        and ``checkpoint_config.storage_uri`` name different places.
    """
    if scaling_config is not None and not isinstance(scaling_config, ScalingConfig):
        raise TypeError("scaling_config must be a dckpt.air.ScalingConfig, not "
                        f"{type(scaling_config).__name__}")
    if run_config is not None and not isinstance(run_config, RunConfig):
        raise TypeError(f"run_config must be a dckpt.air.RunConfig, not "
                        f"{type(run_config).__name__}")
    scaling = scaling_config or ScalingConfig()
    run = run_config or RunConfig()
    failure = run.failure_config
    workers = _agree("num_workers", num_workers, "scaling_config.num_workers",
                     scaling.num_workers)
    failures = _agree("max_failures", max_failures, "run_config.failure_config.max_failures",
                      None if failure is None else failure.max_failures)
    config = _agree("checkpoint_config", checkpoint_config, "run_config.checkpoint_config",
                    run.checkpoint_config)
    name = _agree("run_name", run_name, "run_config.name", run.name) or (
        f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    uri = run.storage_uri_for(name)
    if uri is not None:
        config = config or CheckpointConfig()
        if config.storage_uri is not None and config.storage_uri != uri:
            raise ValueError(
                f"run_config.storage_path puts the checkpoints at {uri!r}, "
                f"checkpoint_config.storage_uri at {config.storage_uri!r}; give one of them"
            )
        config = dataclasses.replace(config, storage_uri=uri)
    workers = DEFAULT_NUM_WORKERS if workers is None else workers
    return TrainerSettings(
        num_workers=workers,
        max_failures=DEFAULT_MAX_FAILURES if failures is None else failures,
        checkpoint_config=config, run_name=name,
        scaling_config=dataclasses.replace(scaling, num_workers=workers),
    )


def _agree(flat_name: str, flat: Any, config_name: str, configured: Any) -> Any:
    if flat is not None and configured is not None and flat != configured:
        raise ValueError(
            f"{flat_name}={flat!r} and {config_name}={configured!r} disagree; give the "
            "setting once (Ray AIR's configs or the flat keyword), or the same value in both"
        )
    return configured if flat is None else flat


def _expanded(path: str) -> str:
    return os.path.expanduser(path) if "://" not in path else path


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
