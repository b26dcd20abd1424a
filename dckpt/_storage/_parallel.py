"""Many small filesystem calls on a thread pool: transfers with progress, removals.

The pool has ``dckpt.storage.max-concurrency`` threads. It works for synchronous
filesystems (``memory://``, local) and asynchronous ones (``s3fs``, whose sync methods
hand the call to fsspec's event-loop thread) alike.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Callable, Sequence

import dask.config
import fsspec
from fsspec.callbacks import Callback

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)


def transfer_all(
    jobs: Sequence[tuple[str, str, Callable[[Callback], None]]], callback: Callback
) -> None:
    """Run ``(source, destination, fn(child_callback))`` jobs with progress."""
    callback.set_size(len(jobs))
    lock = threading.Lock()  # callbacks (tqdm, ...) are not thread-safe

    def run(source: str, destination: str, fn: Callable[[Callback], None]) -> None:
        with lock:
            child = callback.branched(source, destination)
        with child:
            fn(child)
        with lock:
            callback.relative_update(1)

    run_parallel([functools.partial(run, *job) for job in jobs])


def remove_all(fs: fsspec.AbstractFileSystem, paths: Sequence[str]) -> None:
    """Remove files, in parallel; those already gone are fine (also when a file
    has taken the place of a folder on the way)."""

    def remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            fs.rm_file(path)

    run_parallel([functools.partial(remove, path) for path in paths])


def run_parallel(tasks: Sequence[Callable[[], None]]) -> None:
    """Run ``tasks`` on ``dckpt.storage.max-concurrency`` threads; raise the first
    failure once the running tasks have ended (those not started never start)."""
    if not tasks:
        return
    workers = min(max(1, int(dask.config.get("dckpt.storage.max-concurrency"))), len(tasks))
    executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dckpt-io")
    try:
        futures = [executor.submit(task) for task in tasks]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        if not future.cancelled() and (error := future.exception()) is not None:
            raise error
