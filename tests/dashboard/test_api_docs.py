"""`GET /docs`: Swagger UI from the package itself, in a real Chromium that may reach nothing
but the service (no CDN, as on a machine without internet)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from playwright.sync_api import Route

from api.docs import VENDOR_DIR
from tests.dashboard.conftest import Tab
from tests.service.conftest import Service


def test_api_docs_render_offline(tab: Tab, service: Service) -> None:
    own = urlsplit(service.url).netloc
    elsewhere: list[str] = []

    def only_the_service(route: Route) -> None:
        if urlsplit(route.request.url).netloc == own:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    tab.page.route("**/*", only_the_service)
    response = tab.page.goto(service.url + "/docs")
    assert response is not None and response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    # the operations of the OpenAPI document, rendered by Swagger UI
    tab.page.get_by_text("/v1/jobs/{job_id}/events").first.wait_for()
    for path in ("/v1/jobs", "/v1/methods", "/v1/schedules"):
        assert tab.page.locator(f".opblock-summary-path[data-path='{path}']").count() >= 1
    assert re.search(r"merge-service", tab.page.locator(".title").first.inner_text())
    tab.screenshot("docs")
    assert elsewhere == []


def test_docs_assets(service: Service) -> None:
    import httpx

    with httpx.Client(base_url=service.url) as http:
        for name, media in (("swagger-ui-bundle.js", "text/javascript"),
                            ("swagger-ui.css", "text/css")):
            answer = http.get(f"/docs/assets/{name}")
            assert answer.status_code == 200 and answer.headers["content-type"].startswith(media)
            assert answer.content == (VENDOR_DIR / name).read_bytes()
        assert http.get("/docs/assets/LICENSE").status_code == 404  # only what the page loads
        assert http.get("/docs/assets/..%2F..%2Fapp.py").status_code == 404
        assert http.get("/redoc").status_code == 404  # FastAPI's CDN page is not served
        assert (VENDOR_DIR / "LICENSE").read_text().lstrip().startswith("Apache License")
