"""Ray AIR's names (``ray.air``, Ray 2.6) for dckpt, so a port changes imports only.

``from ray.air import session, Checkpoint, ScalingConfig, RunConfig`` becomes
``from dckpt.air import ...``. Every name here is re-exported from its one home:
:class:`~dckpt.Checkpoint` from :mod:`dckpt._checkpoint`, the configs and
:class:`~dckpt.train.Result` from :mod:`dckpt.train`; :mod:`dckpt.air.session` is a
view of :mod:`dckpt.train`'s session functions. Framework checkpoints, trainers and
predictors live in ``dckpt.train.<framework>`` (``dckpt.train.torch``), as Ray's do
in ``ray.train.<framework>``. Where dckpt differs from Ray on purpose, the README's
"Coming from Ray AIR" table says so.
"""

from __future__ import annotations

from dckpt._checkpoint import Checkpoint
from dckpt.air import session
from dckpt.train import (
    CheckpointConfig,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
)

__all__ = [
    "Checkpoint",
    "CheckpointConfig",
    "FailureConfig",
    "Result",
    "RunConfig",
    "ScalingConfig",
    "session",
]
