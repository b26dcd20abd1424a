"""``python -m dckpt ...``: the ``dckpt`` command line (:mod:`dckpt.cli`)."""

from dckpt.cli import main

raise SystemExit(main())
