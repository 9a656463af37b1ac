"""Every dashboard page loads without a single failed request of the browser's own (the tab
fixture forgives "Failed to load resource", which API calls refused on purpose log): no
`/favicon.ico` 404 in the console of every page."""

from __future__ import annotations

from playwright.sync_api import ConsoleMessage

from tests.dashboard.conftest import Tab


def test_pages_load_without_a_failed_request(tab: Tab) -> None:
    failed: list[str] = []

    def note(message: ConsoleMessage) -> None:
        if message.type == "error":
            failed.append(f"{tab.page.url}: {message.text}")

    tab.page.on("console", note)
    for path in ("/", "/new", "/schedules", f"/jobs/{'0' * 20}"):
        # no key entered: the pages ask for one and call no API, so nothing is refused
        tab.goto(path)
        tab.page.wait_for_load_state("networkidle")
    assert failed == [], failed
    # the page's icon is ours, served from the dashboard's own origin
    icon = tab.page.locator("link[rel=icon]").get_attribute("href")
    assert icon is not None and icon.startswith("/static/")
    answer = tab.page.request.get(tab.base_url + icon)
    assert answer.ok and answer.headers["content-type"] == "image/svg+xml"
