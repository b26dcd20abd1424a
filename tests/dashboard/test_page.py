"""The checkpoints page in a real browser: Debian's headless Chromium, driven by Selenium.

One isolated two-node cluster with a dashboard for the module; dckpt is installed
after the scheduler started (``install(client)``), the way most users add it. The
preload's way is checked in ``test_routes.py``.

Set ``DCKPT_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to keep the screenshot that the
README shows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from dckpt import Checkpoint
from dckpt.cluster import NodeCluster
from tests._waiting import eventually
from tests._web_nodes import client, cluster  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Bokeh 3 renders each widget in a shadow root: collect the text through them.
_DEEP_TEXT = """
function text(node) {
    let out = "";
    if (node.shadowRoot) { out += text(node.shadowRoot); }
    for (const child of node.childNodes) {
        if (child.nodeType === Node.TEXT_NODE) { out += child.textContent.trim() + "\\n"; }
        else if (!["STYLE", "SCRIPT"].includes(child.nodeName)) { out += text(child); }
    }
    return out;
}
return text(document.body);
"""

_DEEP_FIND = """
function find(node, selector) {
    const here = node.querySelector(selector);
    if (here) { return here; }
    for (const element of node.querySelectorAll("*")) {
        if (element.shadowRoot) {
            const found = find(element.shadowRoot, selector);
            if (found) { return found; }
        }
    }
    return null;
}
return find(document, arguments[0]);
"""




@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, "
                    f"{CHROMEDRIVER}); .ci/run installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _written_on_node_0() -> Checkpoint:
    """On node 0: a 2 MiB directory checkpoint (a node reference once it leaves)."""
    import numpy as np

    return Checkpoint.from_directory(
        Checkpoint.from_dict({"weights": np.random.default_rng(0).random(1 << 18)}).to_directory()
    )


def _read(checkpoint: Checkpoint) -> int:
    return len(checkpoint.to_dict()["weights"])


def test_the_page_shows_where_a_checkpoint_is_as_nodes_read_it(
    cluster: NodeCluster, client: Client, browser: Any
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    assert cluster.dashboard_link is not None
    node_0, node_1 = (n.worker_address for n in cluster.nodes)
    checkpoint = client.submit(_written_on_node_0, workers=[node_0], pure=False)
    kind, ref = checkpoint.result().get_internal_representation()
    assert kind == "node_ref"

    browser.get(cluster.dashboard_link)  # distributed's status page
    browser.find_element(By.LINK_TEXT, "Checkpoints").click()
    assert browser.current_url.endswith("/checkpoints")

    def page() -> str:
        return str(browser.execute_script(_DEEP_TEXT))

    eventually(page, lambda text: ref.checkpoint_id in text and "node-0: origin" in text,
               "the checkpoint listed with node-0 as its origin")
    assert "node-1: cached" not in page()

    assert client.submit(_read, checkpoint, workers=[node_1], pure=False).result() == 1 << 18
    text = eventually(page, lambda text: "node-1: cached" in text,
                      "node-1 listed as a holder once it read the checkpoint")
    assert "node-0: origin" in text and "1 checkpoint on 2 workers" in text

    # The filter, typed into: no row matches, then the row is back.
    box = browser.execute_script(_DEEP_FIND, "input[placeholder^='filter']")
    box.send_keys(typed := "no-such-checkpoint")
    eventually(page, lambda text: "(0 rows)" in text and ref.checkpoint_id not in text,
               "the filter leaving no row")
    box.send_keys(Keys.BACKSPACE * len(typed))
    eventually(page, lambda text: "(1 row)" in text and ref.checkpoint_id in text,
               "the row back once the filter is empty")

    shot = os.environ.get("DCKPT_DASHBOARD_SCREENSHOT")
    if shot:
        # The rate plots and the nodes table show node-1's transfer by now.
        eventually(page, lambda text: "of 10.00 GiB" in text, "the nodes table")
        browser.save_screenshot(str(Path(shot).resolve()))
