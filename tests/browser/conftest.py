"""Browser tests: headless Chromium (Debian's `chromium`, driven by Playwright) against the whole
stack of tests/e2e (real Postgres, moto, uvicorn, the local worker running examples/tasks.py).

Chromium is installed by `make test` (scripts/ensure-chromium); these tests fail, not skip, when it
is missing. Screenshots go to test-output/screenshots/ (gitignored).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.e2e.conftest import API_KEY, Stack, stack

__all__ = ["API_KEY", "CHROMIUM", "SCREENSHOTS", "Dashboard", "Stack", "browser", "dashboard", "stack"]

CHROMIUM = os.environ.get("TICKWEAVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium stalls on an offline machine.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
STATE_TIMEOUT_MS = 60_000  # deadline for a run to reach a state; the page is polled until then


@dataclass
class Dashboard:
    """The dashboard open in one browser page, over one stack."""

    page: Page
    stack: Stack
    name: str
    page_errors: list[str] = field(default_factory=list)

    def open(self, route: str = "") -> None:
        self.page.goto(f"{self.stack.base_url}/{route}")

    def go(self, route: str) -> None:
        """Follow a hash route inside the page, as clicking a link does."""
        self.page.evaluate("route => { location.hash = route; }", route)

    def sign_in(self, key: str = API_KEY) -> None:
        self.page.locator("#api-key").fill(key)
        self.page.get_by_role("button", name="Use key").click()

    def screenshot(self, label: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.name}--{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium is not at {CHROMIUM}: `make test` installs it (scripts/ensure-chromium), "
            "or `apt-get install -y chromium`; TICKWEAVE_CHROMIUM points elsewhere"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def dashboard(browser: Browser, stack: Stack, request: pytest.FixtureRequest) -> Iterator[Dashboard]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    dash = Dashboard(page, stack, request.node.name)
    page.on("pageerror", lambda exc: dash.page_errors.append(str(exc)))
    try:
        yield dash
        dash.screenshot("final")  # the last state, failed or not
        assert not dash.page_errors, f"uncaught JavaScript errors on the page: {dash.page_errors}"
    finally:
        context.close()
