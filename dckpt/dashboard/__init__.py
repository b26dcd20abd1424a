"""A "Checkpoints" page in the Dask dashboard of the scheduler.

:func:`add_page` adds it to a running scheduler's dashboard: the scheduler plugin
(:class:`~dckpt.cluster.DckptSchedulerPlugin`) calls it at start, through the setting
``dckpt.dashboard.page``, so that ``dckpt.cluster.install(client)`` and
``dask scheduler --preload scheduler/dckpt_scheduler_preload.py`` both get it. It shows,
updated live from the scheduler's registry: every checkpoint (id, size, which nodes hold
it and how — origin, cached, pinned — which are fetching it, its URIs), per node its
cache use against its budget, bytes sent and received, hits and misses, the transfers in
progress (from, to, bytes done of total, rate), and each node's transfer rate over the
last minutes. It is at ``/checkpoints`` of the dashboard, and "Checkpoints" is added to
the dashboard's navigation bar.

Needs bokeh (as Dask's dashboard does: ``pip install 'dckpt[dashboard]'``) and a
scheduler started with a dashboard; without either, :func:`add_page` adds nothing and
says so at DEBUG. Importing this package does not import bokeh.
"""

from __future__ import annotations

from dckpt.dashboard._routes import add_page

__all__ = ["add_page"]
