"""``CheckpointConfig``: which checkpoints a training run keeps, and where it persists them."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CheckpointConfig"]

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


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
