"""Adding the page to a running scheduler's dashboard, the way distributed adds its own.

distributed builds its pages into one Bokeh server application
(``distributed.dashboard.scheduler.connect``: ``BokehApplication(applications, ...)``,
``http_application.add_application``, ``initialize``, ``start``) when the scheduler
starts; its list of pages is fixed by then. The page is added afterwards as a Bokeh
application of its own, made by the same ``BokehApplication`` with the same template
variables and prefix, on the scheduler's ``http_application``, which asks each
application it holds for a route in turn.

The touches of distributed's internals, each for a reason:

- the navigation bar lists ``template_variables(scheduler)["pages"]``
  (``distributed.dashboard.scheduler``, memoized per scheduler, its ``pages`` list
  shared by every page's template variables): the page's name is appended to that
  list, so that the pages rendered from then on link to it;
- the URL prefix of the dashboard (``dask scheduler --dashboard-prefix``) is not kept
  on the scheduler: it is read from distributed's own Bokeh application (``prefix``).
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler

__all__ = ["PAGE", "add_page"]

logger = logging.getLogger(__name__)

#: The page's name: its path under the dashboard and its label in the navigation bar.
PAGE = "checkpoints"

_added: weakref.WeakSet[Any] = weakref.WeakSet()


def add_page(scheduler: Scheduler) -> bool:
    """Add the "Checkpoints" page to ``scheduler``'s dashboard (its event loop).

    Idempotent. Returns whether the page is there: False, with a DEBUG message, when
    bokeh (or a version of it that distributed accepts) is not installed or the
    scheduler runs without its dashboard (``--no-dashboard``: its HTTP server then
    serves ``/metrics`` and the like, and no page is added to it).
    """
    if scheduler in _added:
        return True
    application = getattr(scheduler, "http_application", None)
    if application is None:
        logger.debug("no dckpt dashboard page: the scheduler has no HTTP server")
        return False
    try:
        from distributed.dashboard.core import BokehApplication
        from distributed.dashboard.scheduler import template_variables
        from tornado.ioloop import IOLoop

        from dckpt.dashboard._page import checkpoints_doc
    except ImportError as e:
        logger.debug("no dckpt dashboard page: %r (pip install 'dckpt[dashboard]')", e)
        return False
    prefix = _prefix(application)
    if prefix is None:
        logger.debug("no dckpt dashboard page: the scheduler runs without its dashboard")
        return False
    variables = template_variables(scheduler)
    if PAGE not in variables["pages"]:
        pages = variables["pages"]
        # Before "info", the last of distributed's, if it is there.
        pages.insert(pages.index("info") if "info" in pages else len(pages), PAGE)
    bokeh_app = BokehApplication({f"/{PAGE}": checkpoints_doc}, scheduler,
                                 prefix=prefix, template_variables=variables)
    application.add_application(bokeh_app)
    bokeh_app.initialize(IOLoop.current())
    bokeh_app.start()
    _added.add(scheduler)
    logger.info("dckpt dashboard page at /%s", PAGE)
    return True


def _prefix(application: Any) -> str | None:
    """The dashboard's URL prefix, as distributed's own Bokeh application has it; None
    when there is no such application (no dashboard)."""
    from bokeh.server.server import BokehTornado

    for app in getattr(application, "applications", ()):
        if isinstance(app, BokehTornado) and isinstance(app.prefix, str):
            return app.prefix or "/"
    return None
