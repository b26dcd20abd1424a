"""Damage in transit, for tests: a worker's next chunks go out with one byte flipped.

It stands for a bad network: receivers must detect each damaged chunk by its checksum
and fetch it again (``dckpt.transfer.retries``). The library has no hook for this; the
helper patches, inside the worker's process (through ``client.run``), the sender's
step between reading a chunk and writing it to the comm
(``dckpt.cluster._chunk_sender._ReadAhead.read``, awaited once per chunk sent from a buffer,
and ``_ReadAhead.region`` for a chunk sent from its file with ``os.sendfile``, whose
bytes the process never sees: there the header's checksum is damaged), much as
``tests/cluster/test_broadcast.py`` gates ``dckpt._transfer.ChunkSource`` in an owner.
Every sender of that process is affected (one store per worker process).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from distributed import Client

# Set in the worker's process while a patch is installed:
# [the original read, chunks left, the original region].
_PATCH_ATTRIBUTE = "_dckpt_test_damage"


def _damage_next_chunks(count: int) -> None:
    """In a worker: flip the last byte of each of the next ``count`` chunks sent."""
    import dckpt.cluster._chunk_sender as stream

    _stop_damaging()
    original = stream._ReadAhead.read
    original_region = stream._ReadAhead.region
    state: list[Any] = [original, int(count), original_region]

    async def read(self: Any, spec: Any, max_ratio: float | None = None) -> Any:
        header, payload, buffer = await original(self, spec, max_ratio)
        if state[1] > 0:
            state[1] -= 1
            damaged = bytearray(payload)  # a copy: the buffer is reused for later reads
            damaged[-1] ^= 0x01
            payload = damaged
        return header, payload, buffer

    async def region(self: Any, spec: Any) -> Any:
        header, file_region = await original_region(self, spec)
        if state[1] > 0:
            state[1] -= 1
            damaged = bytearray(header)
            damaged[-1] ^= 0x01  # the checksum's last byte: the bytes no longer match it
            header = bytes(damaged)
        return header, file_region

    stream._ReadAhead.read = read  # type: ignore[method-assign]
    stream._ReadAhead.region = region  # type: ignore[method-assign]
    setattr(stream, _PATCH_ATTRIBUTE, state)


def _stop_damaging() -> int:
    """In a worker: undo :func:`_damage_next_chunks`; how many chunks were left undamaged."""
    import dckpt.cluster._chunk_sender as stream

    state = getattr(stream, _PATCH_ATTRIBUTE, None)
    if state is None:
        return 0
    stream._ReadAhead.read = state[0]  # type: ignore[method-assign]
    stream._ReadAhead.region = state[2]  # type: ignore[method-assign]
    delattr(stream, _PATCH_ATTRIBUTE)
    return int(state[1])


@contextlib.contextmanager
def chunks_damaged_in_transit(client: Client, address: str, count: int) -> Iterator[None]:
    """The next ``count`` chunks the worker at ``address`` sends arrive damaged.

    On leaving the block the sender is whole again; it fails the test if fewer than
    ``count`` chunks were sent meanwhile (the damage the test counted on never happened).
    """
    client.run(_damage_next_chunks, count, workers=[address])
    try:
        yield
    finally:
        left = client.run(_stop_damaging, workers=[address])[address]
    assert left == 0, f"only {count - left} of the {count} chunks to damage were sent"
