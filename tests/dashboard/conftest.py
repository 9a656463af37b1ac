"""Fixtures of the dashboard tests: a real headless Chromium (Debian's `chromium`, driven by
Playwright) against the service of `tests/service/conftest.py` (a real API process, a real
Celery worker and a real Redis server, API keys configured).

Screenshots go to `tests/dashboard/artifacts/` (git-ignored; CI keeps them as artifacts).
Every page is watched for JavaScript errors and Content-Security-Policy violations: a test
fails if its pages logged any.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.service.conftest import (  # noqa: F401  (fixtures, used by name)
    KEYS,
    Service,
    minilm_inputs,
    redis_server,
    service,
)

CHROMIUM = Path(os.environ.get("MERGE_SERVICE_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).parent / "artifacts"
STATIC = Path(__file__).parents[2] / "api" / "static"


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (.ci/run "
                    "does) or set MERGE_SERVICE_TEST_CHROMIUM")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


class Tab:
    """One browser tab (its own sessionStorage) with the problems its pages reported."""

    def __init__(self, page: Page, base_url: str, name: str) -> None:
        self.page, self.base_url, self.name = page, base_url, name
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        # a refused request (401 before the key is entered, 404) is logged by Chromium as an
        # error "Failed to load resource"; those are expected by the tests that cause them
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(f"console: {message.text}")

    def goto(self, path: str) -> None:
        self.page.goto(self.base_url + path)

    def log_in(self, role: str = "submit") -> None:
        """Enter the key in the header form, as a person would (once per tab)."""
        self.page.get_by_label("API key").fill(KEYS[role])
        self.page.get_by_role("button", name="Use key").click()
        self.page.locator("#key-set").wait_for(state="visible")

    def screenshot(self, label: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def tab(browser: Browser, service: Service,  # noqa: F811
        request: pytest.FixtureRequest) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    opened = Tab(page, service.url, request.node.name.removeprefix("test_"))
    yield opened
    opened.screenshot("end")  # the last state, for a failing test above all
    print("\n".join(opened.errors))
    context.close()
    assert opened.errors == [], opened.errors


@pytest.fixture
def charts_page(browser: Browser) -> Iterator[Page]:
    """A page of `app.css`, `common.js` and `charts.js` alone (no service): `Charts.render`
    on a report made up by the test."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_content('<!doctype html><html><body data-auth-required="false">'
                     '<div id="charts" class="charts"></div></body></html>')
    page.add_style_tag(path=str(STATIC / "app.css"))
    page.add_script_tag(path=str(STATIC / "common.js"))
    page.add_script_tag(path=str(STATIC / "charts.js"))
    yield page
    page.close()
    assert errors == [], errors
