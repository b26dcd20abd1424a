"""Receives in progress in this process: what they are, how far, and a log line per tenth.

:func:`~dckpt._transfer.receive_directory` keeps one :class:`ReceiveProgress` here for
the time it runs, so that whoever watches this process (a node store reporting to the
scheduler's registry, the dashboard's transfers table) reads how far each transfer is
without a callback threaded through every layer. :func:`receiving` gives copies.

A receive of at least ``dckpt.transfer.log-progress-bytes`` also logs its progress at
INFO under this module's logger (``dckpt._transfer._progress``, below ``dckpt``) each
time it passes another tenth of its bytes, with its rate since the start: where people
wait for a large checkpoint, the worker's log says how far it is.

Updates come from the event loop of the receive; :func:`receiving` may be called from
any thread (a lock guards the table).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import dask.config
from dask.utils import format_bytes, parse_bytes

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)

__all__ = ["ReceiveProgress", "receiving"]

logger = logging.getLogger(__name__)

_LOG_SETTING = "dckpt.transfer.log-progress-bytes"
_STEPS = 10  # a log line per tenth


@dataclasses.dataclass
class ReceiveProgress:
    """One receive: checkpoint (content) id, where from, where to, bytes done of total.

    ``source`` is how the caller named the sender (e.g. ``the store of node node-0 at
    tcp://...``), empty when it named none; ``started`` is ``time.monotonic()``.
    """

    checkpoint_id: str
    source: str
    target: str
    total: int
    done: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    def rate(self, now: float | None = None) -> float:
        """Bytes per second since the start."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0


class _Tracked:
    """A receive in the table, and its logging."""

    def __init__(self, progress: ReceiveProgress) -> None:
        self.progress = progress
        threshold = dask.config.get(_LOG_SETTING)
        self._logs = threshold is not None and progress.total >= parse_bytes(threshold)
        self._logged_step = 0

    def add(self, length: int) -> None:
        with _lock:
            self.progress.done += length
        if self._logs and self.progress.total:
            step = self.progress.done * _STEPS // self.progress.total
            if step > self._logged_step:
                self._logged_step = step
                p = self.progress
                logger.info(
                    "receiving checkpoint %s%s: %d%% (%s of %s, %s/s)", p.checkpoint_id,
                    f" from {p.source}" if p.source else "", p.done * 100 // p.total,
                    format_bytes(p.done), format_bytes(p.total), format_bytes(int(p.rate())),
                )


_lock = threading.Lock()
_active: dict[int, _Tracked] = {}


def track(progress: ReceiveProgress) -> _Tracked:
    """Put ``progress`` in the table until :func:`untrack`."""
    tracked = _Tracked(progress)
    with _lock:
        _active[id(tracked)] = tracked
    return tracked


def untrack(tracked: _Tracked) -> None:
    with _lock:
        _active.pop(id(tracked), None)


def receiving() -> list[ReceiveProgress]:
    """Copies of the receives in progress in this process, oldest first."""
    with _lock:
        return sorted((dataclasses.replace(t.progress) for t in _active.values()),
                      key=lambda p: p.started)
