"""Browser fixtures: Debian's Chromium, driven by Playwright, in front of a real lab.

The browser is the system's (`apt-get install chromium`), never one that
`playwright install` downloads. Without it these tests are skipped, saying so.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

# The lab fixtures, shared with the integration tests (imported, so pytest registers them here too).
from tests.integration.conftest import start_lab, users  # noqa: F401

CHROMIUM = Path(os.environ.get("LBSESSION_CHROMIUM", "/usr/lib/chromium/chromium"))  # /usr/bin/chromium is a wrapper
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
VIEWPORT = {"width": 1440, "height": 900}

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install -y --no-install-recommends chromium"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: drives the dashboard in a real browser (Chromium)")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium, closed at the end of the test."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page; the test fails if the page's script threw."""
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    errors: list[Any] = []

    def script_failed(error: Any) -> None:
        errors.append(error)

    page.on("pageerror", script_failed)  # a bound builtin like errors.append cannot be a Playwright handler
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"the dashboard's script failed: {errors}"


async def screenshot(page: Page, name: str) -> Path:
    """Save a screenshot under test-artifacts/ (kept by CI, ignored by git)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
