"""Choosing the fsspec filesystem for a URI, and telling local paths from remote ones.

Storage options (endpoint, credentials, ...) go straight to fsspec. When fsspec knows
a protocol but its backend package is missing, the error names what to install.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import fsspec
import fsspec.core
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import get_filesystem_class, known_implementations

from dckpt.errors import CheckpointURIError

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
