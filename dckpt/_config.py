"""dckpt's settings: defaults from ``dckpt.yaml`` merged into ``dask.config``.

Settings are read where they are used (``dask.config.get("dckpt....")``), so that
``dask.config.set`` works in tests and ``DASK_DCKPT__...`` environment variables work
in worker processes.
"""

from __future__ import annotations

import os
import tempfile

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "dckpt.yaml")


def _load_defaults() -> None:
    with open(_DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)


def temporary_directory() -> str:
    """The folder where checkpoints without a directory of their own are written.

    ``dckpt.temporary-directory``, else Dask's ``temporary-directory``, else the
    system's temporary directory; created if it does not exist yet (a configured
    folder on a fresh node need not).
    """
    configured = dask.config.get("dckpt.temporary-directory", None) or dask.config.get(
        "temporary-directory", None
    )
    path = os.path.abspath(configured or tempfile.gettempdir())
    os.makedirs(path, exist_ok=True)
    return path


_load_defaults()
