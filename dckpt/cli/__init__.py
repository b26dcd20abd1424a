"""The ``dckpt`` command line: ``dckpt inspect``, ``cp``, ``ls`` and ``cluster``.

One module per subcommand, each with ``NAME``, ``SUMMARY`` (a line for ``dckpt
--help``), ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``;
:data:`dckpt.cli._main.SUBCOMMANDS` lists them. Exit status: 0 on
success, 1 on failure (one line on stderr; ``--debug`` adds the traceback), 2 on a
usage error (argparse's own), 130 on Ctrl-C, and 141 when whoever reads stdout stops
reading (``dckpt ... | head``): quietly, as Unix tools do.

141 is what a shell reports for ``cat`` or ``grep`` killed by ``SIGPIPE`` in the
same place (128 + 13), so ``set -o pipefail`` scripts see dckpt behave like them;
0 would claim the whole output was delivered. Python ignores ``SIGPIPE`` (and the
sockets of ``dckpt ls`` need it ignored), so the error is caught instead, following
the recipe of Python's ``signal`` documentation.
"""

from __future__ import annotations

from dckpt.cli._main import main

__all__ = ["main"]
