"""Waiting on a condition in tests: the one polling helper of the suite.

Tests wait on events (``distributed.Event``, a pipe, a file a process writes) where the
code under test offers one; where it offers none (a scheduler's registry refreshed by
heartbeats, a one-way message landing, a child process becoming a zombie) they poll a
condition with :func:`eventually`. The deadline only bounds a hang: it is generous
because a loaded machine is slow, and no test asserts how long anything took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

#: Seconds before :func:`eventually` gives up: long enough for a busy 2-core machine.
TIMEOUT = 30.0
_POLL = 0.02


def eventually(
    read: Callable[[], T],
    ok: Callable[[T], bool] = bool,
    what: str = "the condition",
    *,
    timeout: float = TIMEOUT,
) -> T:
    """Call ``read()`` until ``ok(value)`` holds and return that value.

    Fails the test, showing the last value, when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout:.0f} s, still waiting for {what}; last seen: {value!r}")
        time.sleep(_POLL)
