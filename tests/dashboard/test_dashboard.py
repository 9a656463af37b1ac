"""The dashboard in a real headless Chromium against a real API, worker and Redis.

A merge submitted from the spec editor followed live to `succeeded`, its report drawn as
charts; a running merge cancelled from its page; preflight problems of a bad spec shown next
to it with their lines; the jobs list updating itself; keys, labels and keyboard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import expect

from tests.conftest import assert_nothing_written
from tests.dashboard.conftest import Tab
from tests.service.conftest import KEYS, Inputs, Service, slow_spec, spec_body, wait_for

pytestmark = pytest.mark.slow

JOB_URL = re.compile(r".*/jobs/([0-9a-f]{20})$")
# records every text the element shows, to tell live updates from a final render
WATCH = """([selector, name]) => {
  window[name] = [];
  const node = document.querySelector(selector);
  const note = () => {
    const t = node.textContent;
    if (window[name].at(-1) !== t) window[name].push(t);
  };
  note();
  new MutationObserver(note).observe(node, {childList: true, characterData: true, subtree: true});
}"""


def submit_from_form(tab: Tab, body: dict[str, Any]) -> str:
    """Type the spec (as YAML) into the editor, check it, submit it; return the job id."""
    page = tab.page
    page.get_by_label("Job spec (YAML or JSON)").fill(yaml.safe_dump(body, sort_keys=False))
    page.get_by_role("button", name="Check").click()
    page.locator("#check-ok").wait_for()
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(JOB_URL)
    match = JOB_URL.match(page.url)
    assert match is not None
    return match.group(1)


def test_submit_from_the_form_and_watch_it_succeed(tab: Tab, service: Service,
                                                   minilm_inputs: Inputs, tmp_path: Path) -> None:
    page = tab.page
    tab.goto("/new")
    assert page.locator("#key-form").is_visible()  # the server has keys: asked for one
    tab.log_in("submit")
    # the catalog comes from GET /v1/methods
    page.get_by_label("Method").select_option("tsv")
    assert "alpha" in page.locator("#method-info").inner_text()
    destination = tmp_path / "merged"
    # two of the six layers: the charts need a few matrices, not all (the machine is shared)
    body = spec_body(minilm_inputs, destination, method="tsv", n_models=3, name="from-the-form",
                     options={"include": [r"layer\.[01]\."]})
    page.get_by_label("Job spec (YAML or JSON)").fill(yaml.safe_dump(body, sort_keys=False))
    page.get_by_role("button", name="Check").click()
    page.locator("#check-ok").wait_for()
    assert "The spec is valid." in page.locator("#check-result").inner_text()
    tab.screenshot("1-checked")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(JOB_URL)
    job_id = JOB_URL.match(page.url).group(1)  # type: ignore[union-attr]
    page.evaluate("window.__sameDocument = true")
    page.evaluate(WATCH, ["#progress-text", "__progress"])

    page.locator("#job-status", has_text="succeeded").wait_for(timeout=180_000)
    # followed live: the same document all along (no reload), many progress texts seen
    assert page.evaluate("window.__sameDocument") is True
    seen = page.evaluate("window.__progress")
    assert len(seen) >= 3, seen
    assert page.locator("#job-progress").evaluate("p => p.value") == 1
    timeline = page.locator("#timeline li").evaluate_all(
        "items => items.map(i => i.dataset.status)")
    assert timeline == ["queued", "validating", "running", "succeeded"]
    assert page.locator("#cancel").is_disabled() and page.locator("#retry").is_enabled()
    assert str(destination) in page.locator("#result-section").inner_text()

    # the report, as charts, with the data of GET /v1/jobs/{id}/report
    with service.client("read") as http:
        report = http.get(f"/v1/jobs/{job_id}/report").json()
    matrices = [n for n, t in report["tensors"].items() if "interference" in t]
    assert len(matrices) == 12  # 2 layers × (q, k, v, o, intermediate, output)
    charts = page.locator("#charts")
    charts.locator("figure[data-chart=interference]").wait_for()
    bars = charts.locator("figure[data-chart=interference] rect.bar")
    assert bars.count() == len(matrices)
    drawn = bars.evaluate_all("rs => rs.map(r => Number(r.dataset.value))")
    assert drawn == pytest.approx([report["tensors"][n]["interference"] for n in matrices])
    assert max(bars.evaluate_all("rs => rs.map(r => r.height.baseVal.value)")) > 100

    spectra = charts.locator("figure[data-chart=spectra]")
    assert spectra.locator("path.series").count() == 3  # one line per task
    points = spectra.locator("path.series").evaluate_all(
        "ps => ps.map(p => Number(p.dataset.points))")
    assert points == [len(s) for s in report["tensors"][matrices[0]]["singular_values"]]
    assert all(p == 64 for p in points)
    layer = spectra.get_by_label("Layer")
    layer.select_option(label=matrices[5])
    assert matrices[5].removesuffix(".weight").split("layer.")[-1] in \
        charts.locator("figure[data-chart=spectra] figcaption").inner_text()

    ranks = charts.locator("figure[data-chart=kept-rank] rect.cell")
    assert ranks.count() == len(matrices) * 3
    assert ranks.evaluate_all("cs => cs.map(c => Number(c.dataset.value))") == \
        [k for n in matrices for k in report["tensors"][n]["kept_rank"]]
    # data this method's report does not have: no chart
    assert charts.locator("figure[data-chart=recovery]").count() == 0
    assert charts.locator("figure[data-chart=loss]").count() == 0
    tab.screenshot("2-succeeded-with-report")

    # the jobs list shows it, finished, in the same tab (the key is kept)
    tab.goto("/")
    row = page.locator(f"tr[data-id='{job_id}']")
    row.wait_for()
    assert row.get_attribute("data-status") == "succeeded"
    assert "tsv" in row.inner_text() and "3: ft_a, ft_b, ft_c" in row.inner_text()
    assert not page.locator("#key-form").is_visible()
    tab.screenshot("3-jobs")


def test_cancel_a_running_job(tab: Tab, service: Service, minilm_inputs: Inputs,
                              tmp_path: Path) -> None:
    page = tab.page
    tab.goto("/new")
    tab.log_in("submit")
    destination = tmp_path / "cancelled"
    job_id = submit_from_form(tab, slow_spec(minilm_inputs, destination))
    page.locator("#job-status", has_text="running").wait_for(timeout=120_000)
    wait_for(lambda: page.locator("#job-progress").evaluate("p => p.value") > 0.05,
             timeout=120, interval=0.02, what="the merge to be under way")
    assert page.locator("#retry").is_disabled()
    tab.screenshot("1-running")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel").click()
    page.locator("#job-status", has_text="cancelled").wait_for(timeout=120_000)
    record = service.wait_terminal(job_id)
    assert record.status == "cancelled"
    assert 0 < record.progress.done < record.progress.total
    assert_nothing_written(destination)
    assert page.locator("#timeline li").last.get_attribute("data-status") == "cancelled"
    assert page.locator("#cancel").is_disabled() and page.locator("#retry").is_enabled()
    assert page.locator("#report-section").is_hidden()
    assert f"{record.progress.done} / {record.progress.total}" in \
        page.locator("#progress-text").inner_text()
    tab.screenshot("2-cancelled")


def test_preflight_errors_next_to_the_spec(tab: Tab, service: Service, minilm_inputs: Inputs,
                                           tmp_path: Path) -> None:
    page = tab.page
    tab.goto("/new")
    tab.log_in("submit")
    body = spec_body(minilm_inputs, tmp_path / "never", method="ties",
                     params={"density": 1.5, "lamda": 1.0})
    body["models"][1]["source"] = str(tmp_path / "missing-model")
    text = yaml.safe_dump(body, sort_keys=False)
    page.get_by_label("Job spec (YAML or JSON)").fill(text)
    before = service.store.counts()
    page.get_by_role("button", name="Check").click()
    problems = page.locator("#problems li")
    problems.first.wait_for()
    shown = problems.all_inner_texts()
    assert any("missing-model" in p and "does not exist" in p for p in shown), shown
    assert any("method.params.density" in p for p in shown), shown
    assert any("method.params.lamda" in p and "unknown parameter" in p for p in shown), shown
    assert page.get_by_label("Job spec (YAML or JSON)").get_attribute("aria-invalid") == "true"
    tab.screenshot("1-problems")

    # each problem names its line; its button puts the cursor there
    lines = text.splitlines()
    missing = next(i for i, line in enumerate(lines, 1) if "missing-model" in line)
    problems.filter(has_text="missing-model").get_by_role("button").click()
    editor = page.get_by_label("Job spec (YAML or JSON)")
    assert editor.evaluate("t => t === document.activeElement")
    cursor = editor.evaluate("t => t.value.slice(0, t.selectionStart).split('\\n').length")
    assert cursor == missing - 1 or lines[cursor - 1].lstrip().startswith("- source")

    # submitting a bad spec queues nothing; a schema error is shown the same way
    page.get_by_role("button", name="Submit").click()
    problems.first.wait_for()
    assert page.url.endswith("/new")
    assert service.store.counts() == before
    page.get_by_label("Job spec (YAML or JSON)").fill(text + "colour: blue\n")
    page.get_by_role("button", name="Check").click()
    page.locator("#problems li", has_text="unknown field").wait_for()
    assert f"line {len(lines) + 1}" in page.locator("#problems").inner_text()
    tab.screenshot("2-schema-error")


def test_jobs_list_updates_itself_and_filters(tab: Tab, service: Service,
                                              minilm_inputs: Inputs, tmp_path: Path) -> None:
    page = tab.page
    tab.goto("/")
    assert "Enter an API key" in page.locator("#jobs-status").inner_text()
    page.get_by_label("API key").fill("not-a-key-of-this-server")
    page.get_by_role("button", name="Use key").click()
    page.locator("#notice", has_text="refused").wait_for()
    tab.log_in("read")
    page.locator("#jobs-status", has_text="job").wait_for()
    page.evaluate("window.__sameDocument = true")

    # a job submitted elsewhere appears and finishes without a reload
    with httpx.Client(base_url=service.url, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS['submit']}"}) as http:
        created = http.post("/v1/jobs", json=spec_body(
            minilm_inputs, tmp_path / "listed", name="listed-live",
            options={"include": [r"layer\.0\."]}))
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    row = page.locator(f"tr[data-id='{job_id}']")
    row.wait_for(timeout=10_000)
    page.locator(f"tr[data-id='{job_id}'][data-status='succeeded']").wait_for(timeout=180_000)
    assert page.evaluate("window.__sameDocument") is True
    assert page.locator("tbody tr").first.get_attribute("data-id") == job_id  # newest first
    assert row.locator("progress").evaluate("p => p.value") == 1

    # filters: by name, by status (answered by the API's own filters)
    page.get_by_label("Name").fill("listed-live")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("tbody tr")).to_have_count(1)
    assert page.locator("tbody tr").first.get_attribute("data-id") == job_id
    page.get_by_label("Name").fill("")
    page.get_by_label("Status").select_option("succeeded")
    page.get_by_role("button", name="Apply").click()
    row.wait_for()
    statuses = page.locator("tbody tr").evaluate_all("rs => rs.map(r => r.dataset.status)")
    assert set(statuses) == {"succeeded"}
    tab.screenshot("1-filtered")
    page.get_by_label("Status").select_option("failed")
    page.get_by_role("button", name="Apply").click()
    expect(row).to_have_count(0)
    statuses = page.locator("tbody tr").evaluate_all("rs => rs.map(r => r.dataset.status)")
    assert set(statuses) <= {"failed"}


def test_every_control_has_a_label_and_the_keyboard_reaches_it(tab: Tab,
                                                               service: Service) -> None:
    page = tab.page
    tab.goto("/new")
    tab.log_in("read")
    page.locator("#method-select option").first.wait_for(state="attached")
    for path in ("/", "/new", f"/jobs/{'0' * 20}"):
        tab.goto(path)
        unlabelled = page.evaluate("""() => [...document.querySelectorAll(
            'input, select, textarea, button, progress')].filter(e =>
              !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
              && !e.getAttribute('aria-labelledby') && !(e.textContent || '').trim()
              && e.offsetParent !== null).map(e => e.outerHTML)""")
        assert unlabelled == [], (path, unlabelled)
        # the first Tab reaches the skip link; it moves focus to the main content
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "main"
    # on the editor the keyboard alone reaches the spec, Check and Submit, in that order
    tab.goto("/new")
    page.get_by_label("Job spec (YAML or JSON)").focus()
    order = []
    for _ in range(2):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["check", "submit"]
    # an unknown job: a message, not a blank page
    tab.goto(f"/jobs/{'0' * 20}")
    page.locator("#notice", has_text="no job").wait_for()
    assert json.loads(page.evaluate("JSON.stringify(sessionStorage)"))  # the key is kept
