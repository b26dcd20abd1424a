"""The ``dckpt`` command line: ``dckpt inspect``, ``cp``, ``ls`` and ``cluster``.

One module per subcommand, each with ``NAME``, ``SUMMARY`` (a line for ``dckpt
--help``), ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``;
:data:`SUBCOMMANDS` lists them. Exit status: 0 on
success, 1 on failure (one line on stderr; ``--debug`` adds the traceback), 2 on a
usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from dckpt import __version__
from dckpt.cli import _cluster, _cp, _demo, _inspect, _ls
from dckpt.cli._output import report_failure

__all__ = ["main"]

#: The subcommands, in the order ``dckpt --help`` lists them. A new one (``demo``,
#: with the prediction layer) is a module like these and its name here.
SUBCOMMANDS: tuple[ModuleType, ...] = (_inspect, _cp, _ls, _cluster, _demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``dckpt`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="dckpt", description="Look at, copy and serve dckpt checkpoints.",
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
    except KeyboardInterrupt:
        print(f"dckpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every failure ends up
        if args.debug:
            traceback.print_exc()
        report_failure(args.command, e)
        return 1
    return status
