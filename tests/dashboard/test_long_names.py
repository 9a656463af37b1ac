"""Long names, paths and tensor names (a job name, a model directory, a schedule name with no
space to break at) wrap inside their cells and cards: no page grows wider than the window, and
on a wide window the job and schedule tables fit without scrolling. A narrow window scrolls a
table inside its own box, never the whole page."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dashboard.conftest import Tab
from tests.dashboard.test_schedules_page import schedule_body
from tests.service.conftest import Inputs, Service, spec_body

pytestmark = pytest.mark.slow

LONG = "n" * 160


def page_width(tab: Tab) -> int:
    return int(tab.page.evaluate("document.documentElement.scrollWidth"))


def test_long_names_wrap_instead_of_widening_the_page(tab: Tab, service: Service,
                                                      minilm_inputs: Inputs,
                                                      tmp_path: Path) -> None:
    page = tab.page
    model = tmp_path / ("model-" + "x" * 150)
    model.symlink_to(minilm_inputs.models[0], target_is_directory=True)
    body = spec_body(minilm_inputs, tmp_path / "out", name=LONG, options={"device": "cuda"})
    body["models"][0]["source"] = str(model)
    with service.client("admin") as http:
        # the gpu queue: no worker serves it here, the job waits (and is cancelled at the end)
        created = http.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        schedule = http.post("/v1/schedules", json=schedule_body(
            "s" * 100, minilm_inputs.base, tmp_path, tmp_path / "scheduled") | {"paused": True})
        assert schedule.status_code == 201, schedule.text
        try:
            tab.goto("/")
            tab.log_in("read")
            for width in (1280, 400):
                page.set_viewport_size({"width": width, "height": 900})
                tab.goto("/")
                page.locator(f"tr[data-id='{job_id}']").wait_for()
                assert page_width(tab) <= width
                scroller = page.locator(".table-scroll").first
                fits = scroller.evaluate("s => s.scrollWidth <= s.clientWidth")
                assert fits is (width == 1280)
                tab.screenshot(f"jobs-{width}")

                tab.goto(f"/jobs/{job_id}")
                page.locator("#job-name", has_text=LONG).wait_for()
                assert page_width(tab) <= width
                tab.screenshot(f"job-{width}")

                tab.goto("/schedules")
                page.locator(f"#schedules tr[data-id='{schedule.json()['id']}']").wait_for()
                assert page_width(tab) <= width
                tab.screenshot(f"schedules-{width}")
        finally:
            assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
            assert http.delete(f"/v1/schedules/{schedule.json()['id']}").status_code in (200, 204)
