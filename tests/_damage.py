"""Damage in transit, for tests: a worker's next chunks go out with one byte flipped.

It stands for a bad network: receivers must detect each damaged chunk by its checksum
and fetch it again (``dckpt.transfer.retries``). The library has no hook for this; the
helper patches, inside the worker's process (through ``client.run``), the sender's
step between reading a chunk and sending it, which every sender goes through, on a comm
or on the socket taken from one: ``dckpt.cluster._chunk_sender.read_parts``, for a
chunk sent from a buffer, and ``read_region`` for a chunk sent from its file with
``os.sendfile``, whose bytes the process never sees (there the header's checksum is
damaged), much as ``tests/cluster/test_broadcast.py`` gates
``dckpt._transfer.ChunkSource`` in an owner. Every sender of that process is affected
(one store per worker process).
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
    import threading

    import dckpt.cluster._chunk_sender as sender

    _stop_damaging()
    original, original_region = sender.read_parts, sender.read_region
    state: list[Any] = [original, int(count), original_region]
    lock = threading.Lock()  # called from the senders' threads

    def damage_one() -> bool:
        with lock:
            if state[1] <= 0:
                return False
            state[1] -= 1
            return True

    def read_parts(source: Any, spec: Any, buffer: Any, max_ratio: float | None) -> Any:
        header, payload = original(source, spec, buffer, max_ratio)
        if damage_one():
            damaged = bytearray(payload)  # a copy: the buffer is reused for later reads
            damaged[-1] ^= 0x01
            payload = damaged
        return header, payload

    def read_region(source: Any, spec: Any) -> Any:
        header, file_region = original_region(source, spec)
        if damage_one():
            damaged = bytearray(header)
            damaged[-1] ^= 0x01  # the checksum's last byte: the bytes no longer match it
            header = bytes(damaged)
        return header, file_region

    sender.read_parts = read_parts
    sender.read_region = read_region
    setattr(sender, _PATCH_ATTRIBUTE, state)


def _stop_damaging() -> int:
    """In a worker: undo :func:`_damage_next_chunks`; how many chunks were left undamaged."""
    import dckpt.cluster._chunk_sender as sender

    state = getattr(sender, _PATCH_ATTRIBUTE, None)
    if state is None:
        return 0
    sender.read_parts, sender.read_region = state[0], state[2]
    delattr(sender, _PATCH_ATTRIBUTE)
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
