"""The dashboard in a real browser: what a person running `lbsession run` sees and can do."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from playwright.async_api import Page, expect

from lbsession.lab.topology import Topology
from tests.e2e.conftest import needs_chromium, screenshot

pytestmark = [pytest.mark.e2e, pytest.mark.integration, needs_chromium]

WAIT_MS = 15_000


async def open_dashboard(page: Page, lab: Topology) -> None:
    """Load the page and wait until it shows every server and its event stream is open."""
    assert lab.lb is not None
    await page.goto(lab.admin_url + "/")
    await expect(page.locator("#layer-servers g[data-server]")).to_have_count(len(lab.servers), timeout=WAIT_MS)
    await expect(page.locator("#stream")).to_have_text("live", timeout=WAIT_MS)


async def log_in_and_ask(page: Page, count: int) -> list[tuple[str, str]]:
    """Click "Log in" (login, then six GET /me), wait for every answer; (status, server) of each, oldest first."""
    await page.click("#login")
    answers = page.locator("#demo-log li")
    await expect(answers).to_have_count(count, timeout=WAIT_MS)
    await expect(page.locator("#login")).to_be_enabled(timeout=WAIT_MS)
    items = await answers.all()
    return [(await i.get_attribute("data-status") or "", await i.get_attribute("data-server") or "") for i in items][
        ::-1
    ]


async def number(page: Page, selector: str) -> int:
    """The integer shown in an element."""
    return int((await page.inner_text(selector)).strip())


async def requests_of(page: Page, server_id: str) -> int:
    """The request total the server's box shows."""
    label = await page.text_content(f'g[data-server="{server_id}"] [data-field="requests"]') or ""
    match = re.match(r"(\d+) req", label)
    assert match, label
    return int(match.group(1))


async def test_the_page_shows_the_three_servers_up(start_lab, page: Page) -> None:
    lab: Topology = await start_lab("round-robin")
    await open_dashboard(page, lab)
    for server_id in ("was-1", "was-2", "was-3"):
        box = page.locator(f'#layer-servers g[data-server="{server_id}"]')
        await expect(box).to_have_attribute("data-state", "up", timeout=WAIT_MS)
        await expect(box.locator('[data-field="sessions"]')).to_have_text("0 sessions", timeout=WAIT_MS)
    await expect(page.locator("#strategy")).to_have_value("round-robin")
    await expect(page.locator("#backend")).to_have_text("backend local")
    await screenshot(page, "dashboard-loaded")


async def test_a_login_through_the_balancer_moves_and_counts(start_lab, page: Page) -> None:
    lab: Topology = await start_lab("round-robin")
    await open_dashboard(page, lab)

    answers = await log_in_and_ask(page, 7)

    assert answers[0][0] == "200"
    assert [status for status, _ in answers].count("401") == 4  # round-robin over 3 local stores: the bug
    await page.wait_for_function("Number(document.getElementById('count-requests').textContent) >= 7")
    assert await number(page, "#count-relogin") == 4
    assert int(await page.get_attribute("#diagram", "data-animations") or 0) >= 7
    await expect(page.locator("#event-log tbody tr.relogin")).to_have_count(4)
    login_server = answers[0][1]
    box = page.locator(f'g[data-server="{login_server}"] [data-field="sessions"]')
    await expect(box).to_have_text("1 session", timeout=WAIT_MS)
    await screenshot(page, "dashboard-relogin")


async def test_killing_a_server_turns_it_red_and_its_counters_stop(start_lab, page: Page) -> None:
    lab: Topology = await start_lab("round-robin")
    assert lab.lb is not None
    await open_dashboard(page, lab)

    await page.click('g[data-server="was-2"] [data-action="kill"]')

    box = page.locator('#layer-servers g[data-server="was-2"]')
    await expect(box).to_have_attribute("data-state", "killed", timeout=WAIT_MS)
    await expect(box.locator("rect.box")).to_have_css("fill", "rgb(254, 242, 242)")  # the red of a dead server
    async with asyncio.timeout(10):  # the balancer's health check notices, then nothing is sent there
        while lab.lb.pool.upstreams["was-2"].healthy:
            await asyncio.sleep(0.05)
    before = {s: await requests_of(page, s) for s in ("was-1", "was-2", "was-3")}
    # Its hover text says why it is down, as /status does (refused, or the check's connect failure).
    await expect(box.locator("title")).to_have_text(re.compile(r"^was-2 down: \S"), timeout=WAIT_MS)

    await log_in_and_ask(page, 7)
    expected = before["was-1"] + before["was-3"] + 7
    async with asyncio.timeout(10):  # the page polls /status every second
        while await requests_of(page, "was-1") + await requests_of(page, "was-3") < expected:
            await asyncio.sleep(0.1)

    assert await requests_of(page, "was-2") == before["was-2"]
    await expect(box.locator('[data-field="rate"]')).to_have_text("0.0 req/s")
    await screenshot(page, "dashboard-killed")


async def test_switching_strategy_from_the_page_changes_routing(start_lab, page: Page) -> None:
    lab: Topology = await start_lab("round-robin")
    assert lab.lb is not None
    await open_dashboard(page, lab)
    spread = await log_in_and_ask(page, 7)
    assert len({server for _, server in spread}) == 3  # round-robin: every server in turn

    await page.select_option("#strategy", "sticky-cookie")
    await expect(page.locator("#toast")).to_have_text("strategy is now sticky-cookie", timeout=WAIT_MS)
    assert lab.lb.strategy.name == "sticky-cookie"
    stuck = (await log_in_and_ask(page, 14))[7:]

    assert [status for status, _ in stuck] == ["200"] * 7  # no re-login any more
    assert len({server for _, server in stuck}) == 1  # every request on the login server
    await expect(page.locator(".lb text.big").first).to_have_text("sticky-cookie", timeout=WAIT_MS)
    await screenshot(page, "dashboard-sticky")


async def test_a_scenario_run_from_the_page_counts_its_re_logins_up_to_a_verdict(start_lab, page: Page) -> None:
    lab: Topology = await start_lab("round-robin")
    await open_dashboard(page, lab)
    await page.select_option("#scenario-select", "c01-round-robin-local")
    await expect(page.locator("#scenario-fit")).to_be_hidden()  # the lab is what C1 was written for

    await page.click("#scenario-run")

    status = page.locator("#scenario-status")
    await page.wait_for_function(  # while it runs, the page's re-login counter rises from 0
        "document.getElementById('scenario-status').dataset.state === 'running'"
        " && Number(document.getElementById('scenario-relogins').textContent) > 0",
        timeout=WAIT_MS,
    )
    seen_running = await number(page, "#scenario-relogins")
    await expect(status).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    await expect(page.locator("#scenario-verdict")).to_have_text("PASS")
    assert await number(page, "#scenario-relogins") >= seen_running > 0
    await expect(page.locator("#scenario-checks li.pass")).to_have_count(2)  # C1's two expectations
    await expect(page.locator("#scenario-run")).to_be_enabled()
    assert await number(page, "#count-relogin") > 0  # its requests travelled through the diagram too
    await screenshot(page, "dashboard-scenario")


async def test_an_open_websocket_is_counted_on_the_page_until_it_closes(start_lab, page: Page) -> None:
    lab: Topology = await start_lab("sticky-cookie")
    await open_dashboard(page, lab)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.post(f"{lab.lb.url}/login", json={"username": "wendy"}) as response:
            assert response.status == 200
        async with http.ws_connect(f"{lab.lb.url}/ws") as ws:
            await ws.send_str("hi")
            assert (await ws.receive_json(timeout=WAIT_MS / 1000))["user"] == "wendy"
            await expect(page.locator("#count-tunnels")).to_have_text("1", timeout=WAIT_MS)  # polled from /status
            await expect(page.locator('.lb [data-field="tunnels"]')).to_have_text("websockets: 1 open")
            await screenshot(page, "dashboard-websocket")
    await expect(page.locator("#count-tunnels")).to_have_text("0", timeout=WAIT_MS)


async def test_the_cookie_store_is_drawn_in_the_client_with_its_cookies_size(start_lab, page: Page) -> None:
    lab: Topology = await start_lab("round-robin", backend="cookie")
    await open_dashboard(page, lab)
    await expect(page.locator("#layer-headings")).to_contain_text("in the client", timeout=WAIT_MS)
    await expect(page.locator("[data-cookie-size]")).to_have_text("no cookie sealed yet", timeout=WAIT_MS)
    answers = await log_in_and_ask(page, 7)
    assert [status for status, _ in answers] == ["200"] * 7  # round-robin, and nobody logged out
    size = page.locator("[data-cookie-size]")
    await expect(size).to_have_text(re.compile(r"~\d+ B each, \d+ B max"), timeout=WAIT_MS)
    await screenshot(page, "dashboard-cookie-store")


@pytest.mark.parametrize(
    ("strategy", "balancer", "shown"),
    [
        ("sticky-cookie", {"sticky": {"secret": "integration-test-secret", "mode": "balanced"}}, "mode balanced"),
        ("consistent-hash", {"hash": {"balance_factor": 125}}, "balance factor 125%"),
    ],
)
async def test_the_balancer_box_shows_the_sticky_mode_and_the_balance_factor(
    start_lab, page: Page, strategy: str, balancer: dict, shown: str
) -> None:
    lab: Topology = await start_lab(strategy, balancer=balancer)
    await open_dashboard(page, lab)
    await expect(page.locator(".lb [data-strategy-settings]")).to_have_text(shown, timeout=WAIT_MS)
    audit = page.locator(".lb [data-strategy-counters]")
    if strategy == "consistent-hash":  # its audit of each decision against the bound
        await log_in_and_ask(page, 7)
        await expect(audit).to_have_text(re.compile(r"^over bound 0 · max \d\.\d\dx$"), timeout=WAIT_MS)
    else:
        await expect(audit).to_have_count(0)
    await screenshot(page, f"dashboard-{strategy}-settings")
