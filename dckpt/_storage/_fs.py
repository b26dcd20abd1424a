"""The fsspec filesystem of a URI: choosing it, telling local paths from remote ones,
what the back-end's failures become, and many small calls to it in parallel.


Storage options (endpoint, credentials, ...) go straight to fsspec. When fsspec knows
a protocol but its backend package is missing, the error names what to install.

Every public function of :mod:`dckpt._storage` that touches a URI is wrapped by
:func:`storage_errors`, the one place where back-end exceptions are translated:

- dckpt's own errors (:class:`~dckpt.errors.CheckpointNotFoundError`,
  :class:`~dckpt.errors.IncompleteCheckpointError`,
  :class:`~dckpt.errors.CheckpointFormatError`, ...) pass unchanged;
- a ``FileNotFoundError`` on a read (a missing bucket, a missing ``memory://`` or
  local folder) becomes :class:`~dckpt.errors.CheckpointNotFoundError`;
- anything else the back-end raises (``botocore``'s ``NoCredentialsError`` and
  ``EndpointConnectionError``, ``PermissionError``, a ``FileNotFoundError`` on a write
  into a bucket that does not exist, ...) becomes
  :class:`~dckpt.errors.StorageError` (an ``OSError``), the original kept as
  ``__cause__``;
- ``TypeError``, ``AttributeError``, ``NameError`` and ``AssertionError`` are bugs,
  not storage failures, and pass unchanged.

An exception raised by a progress callback ends the operation like a back-end failure
and is translated the same way (it is the ``__cause__``).

Many small filesystem calls (transfers with progress, removals) run on a thread pool
of ``dckpt.storage.max-concurrency`` threads. It works for synchronous filesystems
(``memory://``, local) and asynchronous ones (``s3fs``, whose sync methods hand the
call to fsspec's event-loop thread) alike.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import dask.config
import fsspec
import fsspec.core
from fsspec.callbacks import Callback
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import get_filesystem_class, known_implementations

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointURIError,
    StorageError,
)

F = TypeVar("F", bound=Callable[..., Any])


# Programming errors: translating them would hide the bug behind a storage message.
_BUGS = (TypeError, AttributeError, NameError, AssertionError)


_LOCAL_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


# What to install when fsspec knows a protocol but its backend is not installed;
# fsspec's own hint ("Install s3fs to access S3") for the others.
_S3_HINT = "pip install 'dckpt[s3]' (which installs s3fs)"


_INSTALL_HINTS = {"s3": _S3_HINT, "s3a": _S3_HINT}


def resolve_uri(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for ``uri`` and the path within it.

    Parameters
    ----------
    uri
        Any URI fsspec understands, chained ones included (``s3://bucket/prefix``).
    storage_options
        Passed unchanged to the filesystem (endpoint, credentials, ...).

    Raises
    ------
    CheckpointURIError
        fsspec does not know the protocol, or its backend package is not installed
        (the message names the package to install).
    """
    try:
        return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    except ImportError as e:
        protocol, advice = _install_advice(uri)
        said = "" if str(e) == advice else f" (fsspec: {e})"
        raise CheckpointURIError(
            f"cannot open {uri!r}: the fsspec backend for protocol {protocol!r} is not "
            f"installed; {advice}{said}"
        ) from e
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        protocol = str(e).partition(":")[2].strip() or fsspec.core.split_protocol(uri)[0]
        raise CheckpointURIError(
            f"cannot open {uri!r}: fsspec does not know the protocol {protocol!r}; "
            "check the spelling, or install the package that registers it with fsspec"
        ) from e


def _install_advice(uri: str) -> tuple[str, str]:
    """The first protocol of ``uri`` (chained or not) whose backend cannot be imported,
    and what to install for it."""
    protocols = [fsspec.core.split_protocol(part)[0] or "file" for part in uri.split("::")]
    missing = protocols[-1]
    for protocol in protocols:
        with contextlib.suppress(ValueError):
            try:
                get_filesystem_class(protocol)
            except ImportError:
                missing = protocol
                break
    if missing in _INSTALL_HINTS:
        return missing, f"install it with {_INSTALL_HINTS[missing]}"
    err = known_implementations.get(missing, {}).get("err")
    return missing, str(err or f"install the package that provides {missing!r} to fsspec")


def is_local_uri(uri: str) -> bool:
    """Whether ``uri`` is a plain path or a ``file://`` (or ``local://``) URI."""
    protocol = fsspec.core.split_protocol(os.fspath(uri))[0]
    return protocol in (None, "file", "local")


def local_path_of(uri: str) -> str:
    """The absolute local path of a ``file://`` URI or plain path (``~`` expanded).

    Raises
    ------
    CheckpointURIError
        ``uri`` is not local (see :func:`is_local_uri`).
    """
    if not is_local_uri(uri):
        raise CheckpointURIError(f"{uri!r} is not a local path or file:// URI")
    return os.path.abspath(LocalFileSystem._strip_protocol(os.fspath(uri)))


@contextlib.contextmanager
def storage_errors(uri: str, operation: str, *, reading: bool) -> Iterator[None]:
    """Translate what the fsspec back-end raises inside the block (see the module's
    docstring). ``operation`` completes "cannot ...", e.g. ``"upload to"``;
    ``reading``: a ``FileNotFoundError`` means there is no checkpoint at ``uri``."""
    try:
        yield
    except (CheckpointError, *_BUGS):
        raise
    except FileNotFoundError as e:
        if reading:
            raise CheckpointNotFoundError(f"no checkpoint at {uri}: {e}") from e
        raise _storage_error(uri, operation, e, " (dckpt creates no buckets: create it "
                             "first, or check the URI)") from e
    except OSError as e:
        if e.errno in _LOCAL_DISK_FULL:
            # This machine's disk, not the back-end: kept as it is, so that callers
            # (the node cache) can tell it from a storage failure another source fixes.
            raise
        raise _storage_error(uri, operation, e, "") from e
    except Exception as e:
        raise _storage_error(uri, operation, e, "") from e


def _storage_error(uri: str, operation: str, cause: Exception, advice: str) -> StorageError:
    message = (f"cannot {operation} {uri}: {type(cause).__name__}: {cause}{advice}; "
               "check the URI, the storage options (endpoint, credentials) and the "
               "network")
    return StorageError(message)


def translated(operation: str, *, reading: bool) -> Callable[[F], F]:
    """Decorate a function that takes a ``uri`` argument with :func:`storage_errors`."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            uri = signature.bind(*args, **kwargs).arguments["uri"]
            with storage_errors(uri, operation, reading=reading):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


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
