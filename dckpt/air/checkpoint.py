"""``ray.air.checkpoint`` of Ray 2.6: ``from dckpt.air.checkpoint import Checkpoint``."""

from __future__ import annotations

from dckpt._checkpoint import Checkpoint

__all__ = ["Checkpoint"]
