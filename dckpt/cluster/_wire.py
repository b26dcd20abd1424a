"""What both ends of a transfer share: the operations, error replies, the raw stream.

The protocol itself is described in :mod:`dckpt.cluster._stream`. Here: the names of
its two operations, the error reply that ends a transfer and the error a receiver
raises for it, the TCP stream beneath a comm that raw chunk bytes travel on, the
socket taken from a comm and the records sent on it, whether a peer is on a loopback
(no link to measure), and how messages name a store.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import struct
from collections.abc import (
    Iterator,
    Mapping,
)

from distributed.comm import Comm, CommClosedError, get_address_host
from tornado.iostream import IOStream

from dckpt import _compat
from dckpt.errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptChunkError,
)

try:  # asked once per piece received (queued_bytes): imported once
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # not POSIX
    _FIONREAD = None

#: The settings a transfer waits for: the other side to answer, or to go on sending.
CONNECT_TIMEOUT = "dckpt.transfer.connect-timeout"
STALL_TIMEOUT = "dckpt.transfer.stall-timeout"

__all__ = [
    "CONNECT_TIMEOUT", "DETACHED", "REPLY", "REQUEST", "STALL_TIMEOUT",
    "PULL_OP", "PUSH_OP", "Op", "error_record", "error_reply", "is_loopback", "queued_bytes", "raise_error",
    "raw_stream", "recv_exactly", "socket_errors", "store_name", "take_socket",
]

logger = logging.getLogger(__name__)


PULL_OP = "dckpt_pull"


PUSH_OP = "dckpt_push"


# kind on the wire -> the error a receiver raises; anything else is a CheckpointError.
_ERRORS: dict[str, type[Exception]] = {
    "not-found": CheckpointNotFoundError,
    "refused": PermissionError,
    "format": CheckpointFormatError,
    "corrupt": CorruptChunkError,
    "value": ValueError,
    "timeout": TimeoutError,
}


def error_reply(error: BaseException) -> dict[str, str]:
    """The message that tells the other side of a transfer why it ends."""
    kind = next((k for k, cls in _ERRORS.items() if isinstance(error, cls)), "other")
    if isinstance(error, CorruptChunkError):
        kind = "corrupt"
    return {"status": "error", "kind": kind, "message": f"{error}"[:2000]}


def raise_error(reply: object, peer: str) -> None:
    """Raise what an error reply says; also for a reply that is no message at all."""
    if not isinstance(reply, Mapping):
        raise CheckpointError(f"{peer} answered {type(reply).__name__}, not a dckpt message; "
                              "does it run dckpt with its node store installed?")
    if reply.get("status") == "error":
        cls = _ERRORS.get(str(reply.get("kind")), CheckpointError)
        raise cls(f"{peer}: {reply.get('message')}")


def raw_stream(comm: Comm) -> IOStream | None:
    """The TCP (or TLS) stream under ``comm``, or None for other comms.

    Chunk bytes written to it straight after a message skip distributed's framing: the
    sender can wait until they are on the wire (``Comm.write`` does not) and reuse its
    buffer, and the receiver reads them into a buffer of its own instead of one that
    the comm allocates per message. Buffers allocated per chunk cost dearly where glibc
    returns them to the system at once (a nanny's ``MALLOC_TRIM_THRESHOLD_``) and fresh
    pages are slow (VMs with free page reporting): there, a GiB of random data went at
    0.34x the socket baseline with a buffer per chunk, 0.62x reusing them (README,
    "Measured").
    """
    return _compat.tcp_stream(comm)


DETACHED = b"D"
"""The sender's answer to ``{"detach": True}``, on the socket it took: go on there.

``b"N"``, on the comm's stream, says it stays on the comm.
"""

REQUEST = struct.Struct("!BIQQd")
"""A request on a taken socket: op, file index, offset, length, link (bytes/s, 0: none)."""

REPLY = struct.Struct("!BIQ")
"""A reply on a taken socket: op, then the lengths of the header and of the payload
that follow it (an error: its :func:`error_reply` as JSON in place of the header)."""


class Op:
    """The first field of a :data:`REQUEST` or :data:`REPLY`."""

    CHUNK = 1
    DONE = 2
    ERROR = 3


def take_socket(comm: Comm) -> socket.socket:
    """The socket under the plain TCP ``comm``, as a socket of its own; aborts ``comm``.

    Call it only when the other side has nothing on the way (see
    :mod:`dckpt.cluster._stream`): tornado reads an idle socket to notice a close, and
    what it has read is lost with the comm. The socket is in blocking mode, for threads.
    """
    sock = _compat.plain_tcp_socket(comm)
    if sock is None:
        raise TypeError(f"{comm!r} is no TCP comm without TLS: its socket cannot be taken")
    fd = os.dup(sock.fileno())
    try:
        taken = socket.socket(fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    comm.abort()  # closes tornado's descriptor only: the connection lives on in ours
    taken.setblocking(True)
    return taken


@contextlib.contextmanager
def socket_errors(stalled: str, gone: str) -> Iterator[None]:
    """A taken socket's errors as a comm's would be: its timeout a ``TimeoutError``
    that says ``stalled``, a lost connection a ``CommClosedError`` that says ``gone``."""
    try:
        yield
    except TimeoutError:
        raise TimeoutError(stalled) from None
    except OSError as e:  # EPIPE, ECONNRESET, or the other side closed
        raise CommClosedError(f"{gone}: {e}") from e


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ConnectionError if the peer closes first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError(f"the connection closed {len(view) - got} bytes short")
        got += n


def queued_bytes(sock: socket.socket) -> int:
    """Bytes that have arrived on ``sock`` and wait to be read (``FIONREAD``); 0 where
    that cannot be asked."""
    if _FIONREAD is None:
        return 0
    try:
        answer = fcntl.ioctl(sock.fileno(), _FIONREAD, b"\0" * 4)
    except OSError:
        return 0
    return int(struct.unpack("i", answer)[0])


def error_record(error: BaseException) -> bytes:
    """The :data:`REPLY` that ends a transfer on a taken socket with ``error``."""
    message = json.dumps(error_reply(error)).encode()
    return REPLY.pack(Op.ERROR, len(message), 0) + message


def is_loopback(address: str) -> bool:
    """Whether ``address`` (a comm's peer) is on a loopback interface of this machine.

    A loopback is no link: what limits it are the cores the two sides share, and on a
    busy machine chunks arrive slowly for want of a core, which would look like a slow
    link to the rate a receiver measures and make the sender compress (0.47x the socket
    copy against 0.78x without, one run each under load). Such a receiver reports no
    link rate, so its sender never compresses.
    """
    try:
        host = get_address_host(address)
    except (ValueError, TypeError):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def store_name(address: str, node_id: str | None = None) -> str:
    """How messages name a store: ``the store of node node-1 at tcp://...``."""
    return f"the store of node {node_id} at {address}" if node_id else f"the store at {address}"
