"""The key shared between the tabs of one browser session, a job page's event stream (its
replay, a dropped connection, a refused key) and "Edit as new merge" in the spec editor, in a
real headless Chromium against the real API, worker and Redis. One small finished job serves
them all."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from playwright.sync_api import Browser, Route, expect

from tests.dashboard.conftest import Tab
from tests.service.conftest import Inputs, Service, slow_spec, spec_body, wait_for

pytestmark = pytest.mark.slow

EVENTS = "**/v1/jobs/*/events"


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


@pytest.fixture
def two_tabs(browser: Browser, service: Service, request: pytest.FixtureRequest
             ) -> Iterator[tuple[Tab, Tab]]:
    """Two tabs of one browser session (one Playwright context)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tabs = []
    for k in (1, 2):
        page = context.new_page()
        page.set_default_timeout(30_000)
        tabs.append(Tab(page, service.url, f"{request.node.name.removeprefix('test_')}-{k}"))
    yield tabs[0], tabs[1]
    for t in tabs:
        t.screenshot("end")
    context.close()
    assert [t.errors for t in tabs] == [[], []]


def test_a_new_tab_gets_the_key_from_an_open_tab(two_tabs: tuple[Tab, Tab], browser: Browser,
                                                 service: Service,
                                                 finished_job: dict[str, Any]) -> None:
    first, second = two_tabs
    first.goto("/new")
    first.log_in("read")
    # a job opened in a new tab: no prompt, the job is shown
    second.goto(f"/jobs/{finished_job['id']}")
    second.page.locator("#job-status", has_text="succeeded").wait_for()
    assert second.page.locator("#key-set").is_visible()
    assert second.page.locator("#key-form").is_hidden()
    # kept in the session only: nothing in localStorage or cookies
    assert second.page.evaluate("localStorage.length + document.cookie.length") == 0
    second.screenshot("1-shared")

    # "Forget key" in one tab forgets it in the other
    second.page.get_by_role("button", name="Forget key").click()
    first.page.locator("#key-form").wait_for(state="visible")
    assert first.page.evaluate("sessionStorage.length") == 0

    # another browser session (context) has no key to share: it asks
    other = browser.new_context()
    try:
        page = other.new_page()
        page.goto(f"{service.url}/jobs/{finished_job['id']}")
        page.locator("#key-form").wait_for(state="visible")
        page.wait_for_timeout(500)
        assert page.locator("#key-form").is_visible()
        assert page.locator("#job-status").inner_text() == "unknown"  # nothing was read
        assert page.locator("#job-name").inner_text() == "Enter an API key to see this job."
    finally:
        other.close()


def test_replayed_events_are_not_announced(tab: Tab, finished_job: dict[str, Any]) -> None:
    page = tab.page
    # watch what the live region says and how often the page renders, from the first moment
    page.add_init_script("""document.addEventListener('DOMContentLoaded', () => {
      window.__said = []; window.__renders = 0;
      const say = document.getElementById('announce');
      new MutationObserver(() => window.__said.push(say.textContent))
        .observe(say, {childList: true, characterData: true, subtree: true});
      new MutationObserver(() => window.__renders++).observe(
        document.getElementById('progress-text'),
        {childList: true, characterData: true, subtree: true});
    })""")
    tab.goto(f"/jobs/{finished_job['id']}")
    tab.log_in("read")
    timeline = page.locator("#timeline li")
    expect(timeline).to_have_count(4)  # the whole stream, replayed
    page.wait_for_timeout(500)
    assert timeline.evaluate_all("items => items.map(i => i.dataset.status)") == \
        ["queued", "validating", "running", "succeeded"]
    assert page.evaluate("window.__said") == ["Job succeeded."]
    assert page.evaluate("window.__renders") == 1
    tab.screenshot("replayed")


def test_a_job_page_without_a_key_asks_for_one(tab: Tab, finished_job: dict[str, Any]) -> None:
    page = tab.page
    tab.goto(f"/jobs/{finished_job['id']}")
    expect(page.locator("#job-name")).to_have_text("Enter an API key to see this job.")
    assert page.locator("#job-status").inner_text() != "loading"
    tab.screenshot("1-no-key")
    tab.log_in("read")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#job-name")).to_have_text(finished_job["name"])

def test_a_dropped_stream_says_reconnecting_until_it_is_back(tab: Tab,
                                                             finished_job: dict[str, Any]
                                                             ) -> None:
    page = tab.page
    tab.goto("/new")
    tab.log_in("read")
    page.route(EVENTS, lambda route: route.fulfill(status=503, body=""))
    tab.goto(f"/jobs/{finished_job['id']}")
    status = page.get_by_role("status").filter(has_text="reconnecting")
    status.wait_for()
    assert status.is_visible()
    page.wait_for_timeout(1500)  # still trying, still saying so (the job had ended: no matter)
    assert status.is_visible()
    tab.screenshot("1-reconnecting")
    page.unroute(EVENTS)
    expect(page.locator("#timeline li")).to_have_count(4, timeout=20_000)
    expect(page.locator("#connection")).to_have_text("")
    assert page.locator("#connection").bounding_box()["height"] == 0  # type: ignore[index]
    tab.screenshot("2-back")



def test_a_running_job_s_duration_moves_on_between_events(tab: Tab, service: Service,
                                                         minilm_inputs: Inputs,
                                                         tmp_path_factory: pytest.TempPathFactory
                                                         ) -> None:
    """A stream that says nothing for a while (a long tensor, a Hub upload; here one that
    never answers): the job page's duration counts on, as the jobs list's does."""
    page = tab.page
    tab.goto("/new")
    tab.log_in("read")
    page.route(EVENTS, lambda route: None)  # held open, silent
    with service.client("submit") as http:
        created = http.post("/v1/jobs", json=slow_spec(
            minilm_inputs, tmp_path_factory.mktemp("ticking") / "out"))
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        try:
            wait_for(lambda: service.store.get(job_id).status == "running",  # type: ignore[union-attr]
                     timeout=120, what="the job to run")
            tab.goto(f"/jobs/{job_id}")
            shown = page.locator("#job-duration")
            shown.wait_for()
            seconds = [float(shown.inner_text().removesuffix(" s"))]
            page.wait_for_timeout(2500)
            seconds.append(float(shown.inner_text().removesuffix(" s")))
            assert seconds[1] - seconds[0] >= 1.5, seconds  # a tick a second
            assert page.locator("#job-status").inner_text() == "running"  # no event came
            tab.screenshot("ticking")
        finally:
            assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
            service.wait_terminal(job_id)

def test_a_stream_refused_with_403_asks_for_a_key(tab: Tab,
                                                  finished_job: dict[str, Any]) -> None:
    page = tab.page
    tab.goto("/new")
    tab.log_in("read")
    calls: list[str] = []

    def refuse(route: Route) -> None:
        calls.append(route.request.url)
        route.fulfill(status=403, json={"error": {"type": "Forbidden", "message": "no"}})

    page.route(EVENTS, refuse)
    tab.goto(f"/jobs/{finished_job['id']}")
    page.locator("#notice", has_text="may not read").wait_for()
    assert page.locator("#key-form").is_visible()
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.wait_for_timeout(2000)
    assert len(calls) == 1  # not retried
    assert page.get_by_role("status").filter(has_text="reconnecting").count() == 0


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

