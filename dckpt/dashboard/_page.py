"""The "Checkpoints" page: a Bokeh document per browser tab, updated live.

Built like distributed's own pages (``distributed/dashboard/components/scheduler.py``):
a component with ``root`` and ``update()``, run every ``dckpt.dashboard.interval`` by
distributed's ``add_periodic_callback``, inside distributed's page template (its
navigation bar) and theme. Runs on the scheduler's event loop; every update reads
the registry's in-memory snapshots only (:mod:`dckpt.dashboard._rows`).

Kept responsive with a thousand checkpoints and fifty nodes: the checkpoints table
shows one page of ``dckpt.dashboard.page-size`` rows (buttons step through the rest,
a text box filters), and a table's data goes to the browser only when it changed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import dask.config
from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource,
    HoverTool,
    InlineStyleSheet,
    NumeralTickFormatter,
)
from bokeh.models.widgets import Button, Div, TextInput
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from dask.utils import parse_timedelta
from distributed.dashboard.components import add_periodic_callback
from distributed.dashboard.components.scheduler import BOKEH_THEME, env
from distributed.scheduler import Scheduler

from dckpt.cluster import DckptSchedulerPlugin
from dckpt.dashboard import _rows

__all__ = ["CheckpointsPage", "checkpoints_doc"]

logger = logging.getLogger(__name__)

#: Seconds of history in the rate plots.
RATE_WINDOW = 300.0


#: (key, title) of each table's columns.
CHECKPOINT_HEADERS = (("checkpoint_id", "Checkpoint"), ("size", "Size"),
                      ("holders", "Held by (node: how)"), ("fetching", "Fetching"),
                      ("uris", "URIs"))
NODE_HEADERS = (("node_id", "Node"), ("address", "Worker"), ("origin", "Origin"),
                ("cache", "Cache (of budget)"), ("entries", "Cached"), ("pinned", "Pinned"),
                ("sent", "Sent"), ("received", "Received"), ("transfers", "Transfers"),
                ("hits", "Hits"), ("misses", "Misses"), ("serving", "Serving"),
                ("age", "Snapshot age"))
TRANSFER_HEADERS = (("checkpoint_id", "Checkpoint"), ("to", "To"), ("source", "From"),
                    ("progress", "Done of total"), ("rate", "Rate"))

# Each Div renders in a shadow root of its own: the style goes with each table.
_TABLE_CSS = """
table.dckpt-table { border-collapse: collapse; font-size: 12px; margin: 4px 0 12px 0; }
table.dckpt-table th { text-align: left; border-bottom: 1px solid #999; padding: 3px 10px; }
table.dckpt-table td { border-bottom: 1px solid #e4e4e4; padding: 3px 10px;
                       font-family: monospace; white-space: nowrap; }
"""


def _table_div(name: str) -> Div:
    return Div(text="", name=name, stylesheets=[InlineStyleSheet(css=_TABLE_CSS)])


class CheckpointsPage:
    """The page's widgets and their update (scheduler event loop).

    The tables are HTML in ``Div`` s rather than Bokeh ``DataTable`` s: a page of 50
    rows is small HTML, and a DataTable seen in headless Chromium kept showing its
    first rows after its data had changed in the browser.
    """

    root: Any

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.page = 0
        self.page_size = int(dask.config.get("dckpt.dashboard.page-size"))
        self._shown: dict[str, Any] = {}
        self._last_done: dict[tuple[str, str], tuple[float, int]] = {}

        self.summary = Div(text="", name="dckpt-summary")
        self.checkpoint_table = _table_div("dckpt-checkpoints")
        self.filter = TextInput(placeholder="filter: id, node, URI", width=300)
        # As the user types, not only on Enter.
        self.filter.on_change("value_input", lambda attr, old, new: self._go(0))
        self.previous = Button(label="previous", width=90)
        self.next = Button(label="next", width=90)
        self.previous.on_click(lambda: self._go(self.page - 1))
        self.next.on_click(lambda: self._go(self.page + 1))
        self.page_label = Div(text="", name="dckpt-page")
        self.node_table = _table_div("dckpt-nodes")
        self.transfer_table = _table_div("dckpt-transfers")

        self.received_rates = ColumnDataSource({"xs": [], "ys": [], "node": [], "color": []})
        self.sent_rates = ColumnDataSource({"xs": [], "ys": [], "node": [], "color": []})
        plots = [self._rate_plot(self.received_rates, "Received per node (bytes/s)"),
                 self._rate_plot(self.sent_rates, "Sent per node (bytes/s)")]

        self.root = column(
            Div(text="<h2>Checkpoints</h2>"), self.summary,
            row(self.filter, self.previous, self.next, self.page_label),
            self.checkpoint_table,
            Div(text="<h3>Nodes</h3>"), self.node_table,
            Div(text="<h3>Transfers in progress</h3>"), self.transfer_table,
            row(*plots),
        )

    @staticmethod
    def _rate_plot(source: ColumnDataSource, title: str) -> Any:
        plot = figure(title=title, x_axis_type="datetime", height=240, width=640,
                      tools="", toolbar_location=None)
        plot.multi_line(xs="xs", ys="ys", line_color="color", line_width=2, source=source,
                        legend_field="node")
        plot.legend.location = "top_left"
        plot.legend.label_text_font_size = "10px"
        plot.yaxis.formatter = NumeralTickFormatter(format="0.0 b")
        plot.add_tools(HoverTool(tooltips=[("node", "@node")]))
        return plot

    def _go(self, page: int) -> None:
        self.page = page
        self.update()

    def update(self) -> None:
        """Read the registry and refresh what changed."""
        plugin = self.scheduler.plugins.get(DckptSchedulerPlugin.name)
        if not isinstance(plugin, DckptSchedulerPlugin):
            self.summary.text = "dckpt is not set up on this scheduler"
            return
        nodes = plugin.nodes()
        checkpoints = plugin.dckpt_checkpoints()
        transfers = plugin.transfers()
        page, self.page, pages, count = _rows.checkpoint_page(
            checkpoints, nodes, self.filter.value_input or "", self.page, self.page_size)
        self._set_html(self.checkpoint_table, _rows.html_table(page, CHECKPOINT_HEADERS, "table"))
        self._set_html(self.page_label,
                       f"page {self.page + 1} of {pages} ({_count(count, 'row')})")
        self._set_html(self.node_table,
                       _rows.html_table(_rows.node_columns(nodes), NODE_HEADERS, "table"))
        self._set_html(self.transfer_table, _rows.html_table(
            _rows.transfer_columns(transfers, self._transfer_rates(transfers)),
            TRANSFER_HEADERS, "table"))
        self._set_html(self.summary, f"{_count(len(checkpoints), 'checkpoint')} on "
                                     f"{_count(len(nodes), 'worker')}; "
                                     f"{_count(len(transfers), 'transfer')} in progress")
        self._update_rates(plugin.rates(RATE_WINDOW))

    @staticmethod
    def _set_html(div: Div, text: str) -> None:
        # Only what changed goes over the websocket.
        if div.text != text:
            div.text = text

    def _set(self, name: str, source: ColumnDataSource, data: dict[str, list[Any]]) -> None:
        if self._shown.get(name) != data:
            self._shown[name] = data
            source.data = data

    def _transfer_rates(self, transfers: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
        """Rate of each receive since this page last saw it."""
        now = time.monotonic()
        rates: dict[tuple[str, str], float] = {}
        seen: dict[tuple[str, str], tuple[float, int]] = {}
        for t in transfers:
            key = (t["to_address"], t["checkpoint_id"])
            before = self._last_done.get(key)
            if before is not None and before[1] != t["done"]:
                rates[key] = (t["done"] - before[1]) / max(now - before[0], 1e-3)
                seen[key] = (now, t["done"])
            else:
                seen[key] = before or (now, t["done"])
        self._last_done = seen
        return rates

    def _update_rates(self, rates: dict[str, dict[str, list[float]]]) -> None:
        for source, key in ((self.received_rates, "received"), (self.sent_rates, "sent")):
            data: dict[str, list[Any]] = {"xs": [], "ys": [], "node": [], "color": []}
            for i, (node_id, series) in enumerate(sorted(rates.items())):
                data["xs"].append([t * 1000 for t in series["time"]])  # ms, for bokeh
                data["ys"].append(series[key])
                data["node"].append(node_id)
                data["color"].append(Category10_10[i % len(Category10_10)])
            self._set(f"rates-{key}", source, data)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def checkpoints_doc(scheduler: Scheduler, extra: dict[str, Any], doc: Document) -> None:
    """The Bokeh document of the page (the signature distributed's pages have)."""
    page = CheckpointsPage(scheduler)
    page.update()
    doc.title = "Dask: Checkpoints"
    interval = parse_timedelta(dask.config.get("dckpt.dashboard.interval"), default="s")
    add_periodic_callback(doc, page, int(interval * 1000))
    doc.add_root(page.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME
