"""The dashboard draws the lab's links: slowed amber with its latency, cut red and dashed; its buttons fault them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Page, expect

from lbsession.lab.faults import AdminClient
from lbsession.lab.topology import Topology
from tests.e2e.conftest import needs_chromium, screenshot
from tests.e2e.test_dashboard import WAIT_MS, open_dashboard

pytestmark = [pytest.mark.e2e, pytest.mark.integration, needs_chromium]


@contextlib.asynccontextmanager
async def dashboard_of(start_lab: Any, page: Page, backend: str, servers: int) -> AsyncIterator[AdminClient]:
    """A round-robin lab on `backend`, its dashboard open in `page`, and its admin client (closed after)."""
    lab: Topology = await start_lab("round-robin", backend=backend, servers=servers)
    admin = AdminClient(lab.admin_url)
    try:
        await open_dashboard(page, lab)
        yield admin
    finally:
        await admin.close()


async def test_a_link_slowed_from_curl_turns_amber_and_its_button_cuts_and_heals_it(start_lab, page: Page) -> None:
    async with dashboard_of(start_lab, page, "redis", 2) as admin:
        edge = page.locator('path[data-link="lb->was-2"]')
        await expect(edge).to_have_count(1, timeout=WAIT_MS)
        await admin.call("PUT", "/links/lb->was-2", {"latency_ms": 150, "jitter_ms": 10})
        await expect(edge).to_have_class("edge slowed", timeout=WAIT_MS)
        await expect(page.locator("#layer-edges text.link-label", has_text="+160 ms")).to_have_count(1)
        await expect(page.locator('path[data-link="was-1->redis-1"]')).to_have_class("edge store", timeout=WAIT_MS)

        await page.click('g[data-action="link"][data-target="lb->was-2"]')  # slowed: the button cuts
        await expect(edge).to_have_class("edge cut", timeout=WAIT_MS)
        _, link = await admin.call("GET", "/links/lb->was-2")
        assert link["faults"]["upstream"]["blackhole"] is True
        await screenshot(page, "dashboard-link-cut")

        await page.click('g[data-action="link"][data-target="lb->was-2"]')  # cut: the button heals
        await expect(edge).to_have_class("edge", timeout=WAIT_MS)
        _, link = await admin.call("GET", "/links/lb->was-2")
        assert link["faults"] == {}


async def test_a_partition_of_two_cluster_peers_turns_their_arc_red(start_lab, page: Page) -> None:
    async with dashboard_of(start_lab, page, "cluster", 3) as admin:
        arc = page.locator('path[data-link="was-1->was-2 was-2->was-1"]')
        await expect(arc).to_have_class("edge peer-up", timeout=WAIT_MS)
        await admin.call("POST", "/partitions", {"name": "p", "cut": ["was-1->was-2", "was-2->was-1"]})
        await expect(arc).to_have_class("edge cut", timeout=WAIT_MS)
        await expect(page.locator('path[data-link="was-1->was-3 was-3->was-1"]')).to_have_class("edge peer-up")
        await screenshot(page, "dashboard-peers-cut")
        await admin.call("DELETE", "/partitions/p", {})
        await expect(arc).to_have_class("edge peer-up", timeout=WAIT_MS)
