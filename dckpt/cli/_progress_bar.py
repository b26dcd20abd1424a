"""Progress bars for long transfers: tqdm, fed by dckpt's fsspec callbacks.

dckpt's long operations take an fsspec ``Callback`` whose own updates count files and
whose branched children count each file's bytes. :class:`BytesProgressCallback`
turns the children's counts into one tqdm bar in bytes. (fsspec's ``TqdmCallback``
shows the outer count, files, and gives children no-op callbacks, so a checkpoint of
one big file would sit at 0 % until done.)
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import dask.config
from dask.utils import parse_bytes
from fsspec.callbacks import DEFAULT_CALLBACK, Callback


class BytesProgressCallback(Callback):
    """An fsspec callback that shows the bytes its branched children report.

    Children may report from several threads at once (parallel uploads and
    downloads); updates of the bar take a lock. The files this callback counts itself
    are not shown: dckpt writes its own control files without telling callbacks, so
    that count would differ from the checkpoint's.
    """

    _bar: Any  # tqdm.tqdm
    _lock: threading.Lock

    def __init__(self, bar: Any) -> None:
        super().__init__()
        self._bar = bar
        self._lock = threading.Lock()

    def branched(self, path_1: str, path_2: str, **kwargs: Any) -> Callback:
        return _ChildCallback(self)

    def call(self, *args: Any, **kwargs: Any) -> None:
        pass  # a file done: its bytes were shown already

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)


class _ChildCallback(Callback):
    """One file's transfer: forwards the bytes it gains to the parent's bar."""

    _parent: BytesProgressCallback
    _reported: int

    def __init__(self, parent: BytesProgressCallback) -> None:
        super().__init__()
        self._parent = parent
        self._reported = 0

    def branched(self, path_1: str, path_2: str, **kwargs: Any) -> Callback:
        return _ChildCallback(self._parent)

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self.value > self._reported:
            self._parent.add_bytes(self.value - self._reported)
            self._reported = self.value


@contextlib.contextmanager
def progress(
    description: str, total: int | None, *, show: bool | None, size_hint: int | None = None
) -> Iterator[Callback]:
    """A callback that shows a bar on stderr, or does nothing.

    Parameters
    ----------
    description
        What the bar is for (``"upload"``, ...).
    total
        Bytes to expect, if known.
    show
        ``True`` (``--progress``), ``False`` (``--quiet``), or ``None``: when stderr
        is a terminal.
    size_hint
        How large the transfer is, when ``total`` is unknown (a bytes file's size).
        Below ``dckpt.cli.progress-min-bytes`` there is no bar.
    """
    hint = total if total is not None else size_hint
    minimum = parse_bytes(dask.config.get("dckpt.cli.progress-min-bytes"))
    if show is None:
        show = sys.stderr.isatty()
    if not show or (hint is not None and hint < minimum):
        yield DEFAULT_CALLBACK
        return
    from tqdm import tqdm  # only when a bar is shown

    with tqdm(total=total, desc=description, unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr, dynamic_ncols=True) as bar:
        yield BytesProgressCallback(bar)
        if total is not None:
            # Done is done: the few control-file bytes dckpt writes itself are not
            # reported to callbacks.
            bar.update(max(0, total - bar.n))
