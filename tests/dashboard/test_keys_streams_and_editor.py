"""The key shared between the tabs of one browser session, a job page's event stream (its
replay, a dropped connection, a refused key) and "Edit as new merge" in the spec editor, in a
real headless Chromium against the real API, worker and Redis. One small finished job serves
them all."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from playwright.sync_api import Route, expect

from tests.dashboard.conftest import Tab
from tests.service.conftest import Inputs, Service, spec_body

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def finished_job(service: Service, minilm_inputs: Inputs,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("keys-streams") / "merged"
    with service.client("submit") as http:
        created = http.post("/v1/jobs", json=spec_body(
            minilm_inputs, out, name="streamed", options={"include": [r"layer\.0\."]}))
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        record = service.wait_terminal(job_id, timeout=300)
        assert record.status == "succeeded", record.error
        return dict(http.get(f"/v1/jobs/{job_id}").json())


def with_required_param(route: Route) -> None:
    """The catalog, with one parameter that has no default (none of ours has one yet)."""
    methods = route.fetch().json()
    ties = next(m for m in methods if m["name"] == "ties")
    ties["params"]["gamma"] = {"type": "number", "description": "a required one"}
    route.fulfill(json=methods)


def test_edit_as_new_merge_then_use_another_method(tab: Tab, finished_job: dict[str, Any]
                                                   ) -> None:
    page = tab.page
    page.route("**/v1/methods", with_required_param)
    tab.goto("/new")
    tab.log_in("submit")
    tab.goto(f"/new?from={finished_job['id']}")
    editor = page.get_by_label("Job spec (YAML or JSON)")
    expect(editor).to_have_value(re.compile(r"^name: streamed$", re.M))
    spec = finished_job["spec"]
    # loaded as YAML, read back as the job's spec
    assert yaml.safe_load(editor.input_value()) == spec
    assert page.locator("#method-select").input_value() == "task_arithmetic"

    # another method: only `method` changes, the text stays YAML
    page.get_by_label("Method", exact=True).select_option("ties")
    assert "required (no default)" in page.locator("#method-info").inner_text()
    page.get_by_role("button", name="Use this method in the spec").click()
    text = editor.input_value()
    assert "undefined" not in text
    assert "# gamma: <number>" in text
    edited = yaml.safe_load(text)
    assert edited["method"] == {"name": "ties", "params": {"density": 0.2, "alpha": 1.0}}
    assert {k: v for k, v in edited.items() if k != "method"} == \
        {k: v for k, v in spec.items() if k != "method"}
    assert "gamma has no default" in page.locator("#method-note").inner_text()
    tab.screenshot("1-yaml")

    # a JSON spec stays JSON; the parameter without a default is left out, with the note
    editor.fill(json.dumps(spec, indent=2))
    page.get_by_role("button", name="Use this method in the spec").click()
    edited = json.loads(editor.input_value())
    assert edited["method"] == {"name": "ties", "params": {"density": 0.2, "alpha": 1.0}}
    assert {k: v for k, v in edited.items() if k != "method"} == \
        {k: v for k, v in spec.items() if k != "method"}
    assert "gamma has no default" in page.locator("#method-note").inner_text()
    tab.screenshot("2-json")

