"""What the command line prints: sizes, tables, JSON, and the one-line failure.

Results go to stdout, diagnostics (errors, progress bars) to stderr, so that
``dckpt inspect --json SRC | jq`` works.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dask.utils import format_bytes


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``, else a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        if value < minimum:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{reason}, not {value}")
        return value

    parse.__name__ = "integer"  # argparse's "invalid integer value" for other failures
    return parse


def size(n: int | None) -> str:
    """``1.00 MiB``-style, or ``?`` when unknown."""
    return "?" if n is None else format_bytes(n)


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout; non-JSON values as their ``str``."""
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: columns padded to their widest cell, numbers right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows)
               for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.rjust(w) if num else cell.ljust(w)
                  for cell, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def report_failure(command: str, error: BaseException) -> None:
    """One line on stderr: what failed and why, without a traceback."""
    if isinstance(error, (CommandError, OSError, ValueError)):
        # dckpt's errors subclass these, and their messages already say what to do.
        message = str(error) or type(error).__name__
    else:
        message = f"{type(error).__name__}: {error} (run with --debug for the traceback)"
    print(f"dckpt {command}: error: {message}", file=sys.stderr)
