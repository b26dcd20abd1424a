"""``dckpt``'s parser and entry point: the subcommands, exit statuses and failures."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from dckpt import __version__
from dckpt.cli import _cluster, _cp, _demo, _inspect, _ls
from dckpt.cli._output import report_failure

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

#: The subcommands, in the order ``dckpt --help`` lists them. A new one (``demo``,
#: with the prediction layer) is a module like these and its name here.
SUBCOMMANDS: tuple[ModuleType, ...] = (_inspect, _cp, _ls, _cluster, _demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``dckpt`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="dckpt",
        description="Inspect and copy dckpt checkpoints, list what the nodes of a running "
                    "cluster hold, run a local cluster, or watch the demo.",
    )
    parser.add_argument("--version", action="version", version=f"dckpt {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="log dckpt's debug messages; show tracebacks of failures")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        subparser = subparsers.add_parser(
            module.NAME, help=module.SUMMARY, description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
        # --debug after the subcommand too; SUPPRESS keeps this default from
        # overwriting a --debug given before it.
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dckpt`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    if args.debug:
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("dckpt").setLevel(logging.DEBUG)
    try:
        status: int = args.run(args)
        sys.stdout.flush()  # a closed pipe is found here, not at interpreter exit
    except KeyboardInterrupt:
        print(f"dckpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return _quiet_after_closed_stdout()
    except Exception as e:  # noqa: BLE001 - the one place every failure ends up
        if args.debug:
            traceback.print_exc()
        report_failure(args.command, e)
        return 1
    return status


#: The exit status when stdout's reader went away (128 + SIGPIPE, as a shell reports).
EXIT_BROKEN_PIPE = 141


def _stdout_closed() -> bool:
    """Whether nobody reads stdout any more (a pipe whose reading end is closed).

    A ``BrokenPipeError`` from elsewhere (a socket, a child's pipe) is a failure
    like any other.
    """
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), or stdout is no file
        return True


def _quiet_after_closed_stdout() -> int:
    # Python's recipe: point stdout at /dev/null, so that flushing it at exit does
    # not raise (and print "Exception ignored ...") again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError) as e:
        if getattr(e, "errno", None) not in (None, errno.EBADF):
            raise
    return EXIT_BROKEN_PIPE
