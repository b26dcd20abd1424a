"""The transfer settings, read where they are used (``dckpt.transfer.*``)."""

from __future__ import annotations

from typing import Literal

import dask.config
from dask.utils import parse_bytes

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)

Compression = Literal["auto", "lz4", "none"]

# lz4 blocks hold at most LZ4_MAX_INPUT_SIZE (~2 GiB); chunks are far smaller anyway.
MAX_CHUNK_BYTES = 1 << 30


def config_chunk_bytes() -> int:
    """``dckpt.transfer.chunk-bytes``, checked."""
    return check_chunk_bytes(parse_bytes(dask.config.get("dckpt.transfer.chunk-bytes")))


def check_chunk_bytes(chunk_bytes: int) -> int:
    """``chunk_bytes`` if it is a usable chunk size, else ValueError."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or not (
        1 <= chunk_bytes <= MAX_CHUNK_BYTES
    ):
        raise ValueError(
            f"chunk size {chunk_bytes!r} is not an integer between 1 and {MAX_CHUNK_BYTES} "
            "bytes; check dckpt.transfer.chunk-bytes"
        )
    return chunk_bytes


def compression() -> Compression:
    """``dckpt.transfer.compression``: ``"auto"``, ``"lz4"`` or ``"none"``."""
    value = dask.config.get("dckpt.transfer.compression")
    if value not in ("auto", "lz4", "none"):
        raise ValueError(
            f"dckpt.transfer.compression is {value!r}; expected 'auto', 'lz4' or 'none'"
        )
    return value  # type: ignore[no-any-return]


def positive_setting(name: str, value: int | None, minimum: int) -> int:
    """``value``, or the setting ``dckpt.transfer.<name>`` when it is None, at least ``minimum``."""
    if value is None:
        value = int(dask.config.get(f"dckpt.transfer.{name}"))
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name.replace('-', '_')} must be an integer of at least {minimum}, "
                         f"got {value!r}")
    return value
