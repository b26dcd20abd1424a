"""The page is added by the scheduler preload as by install(client), links in the
navigation bar, and stays away when turned off: an in-process scheduler with a
dashboard, asked over HTTP."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import dask.config
import pytest
from distributed import Client, Scheduler

from dckpt.cluster import DckptSchedulerPlugin
from dckpt.dashboard import add_page
from dckpt.dashboard._routes import PAGE

PRELOAD = str(Path(__file__).resolve().parents[2] / "scheduler" / "dckpt_scheduler_preload.py")

pytest.importorskip("bokeh")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


async def _pages(
    preload: list[str], install: bool, dashboard: bool = True
) -> tuple[int, str, bool]:
    async with Scheduler(dashboard_address="127.0.0.1:0", port=0, host="127.0.0.1",
                         preload=preload, dashboard=dashboard) as scheduler:
        if install:
            async with Client(scheduler.address, asynchronous=True) as client:
                await client.register_plugin(DckptSchedulerPlugin())
        port = scheduler.http_server.port
        status, page = await asyncio.to_thread(_get, port, f"/{PAGE}")
        _, main = await asyncio.to_thread(_get, port, "/status")
        return status, main, add_page(scheduler)  # a second time: nothing new


@pytest.mark.parametrize("preload, install", [([PRELOAD], False), ([], True)],
                         ids=["preload", "install"])
def test_the_page_is_served_and_linked_from_the_navigation(preload: list[str], install: bool):
    status, main, again = asyncio.run(_pages(preload, install))
    assert status == 200
    assert f'href="{PAGE}"' in main  # distributed's navigation bar lists it
    assert again


def test_a_page_turned_off_is_not_served():
    with dask.config.set({"dckpt.dashboard.page": None}):
        status, main, _ = asyncio.run(_pages([], True))
    assert status == 404 and f'href="{PAGE}"' not in main


def test_a_scheduler_without_its_dashboard_gets_no_page():
    # Its HTTP server still runs, for /metrics: the page must not appear there.
    status, _, added = asyncio.run(_pages([], True, dashboard=False))
    assert status == 404 and not added
