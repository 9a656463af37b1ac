"""The dashboard in a real headless Chromium against a real API, worker and Redis.

A merge submitted from the spec editor followed live to `succeeded`, its report drawn as
charts; a running merge cancelled from its page; preflight problems of a bad spec shown next
to it with their lines; the jobs list updating itself; keys, labels and keyboard.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import expect

from tests.conftest import assert_nothing_written
from tests.dashboard.conftest import Tab
from tests.service.conftest import Inputs, Service, slow_spec, spec_body, wait_for

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
    assert "Spaces for LoRA inputs: core, full, knots" in page.locator("#method-info").inner_text()
    page.get_by_label("Method").select_option("rmm")
    expect(page.locator("#method-info")).to_contain_text(
        "Spaces for LoRA inputs: core, full; takes no per-model weights")
    page.get_by_label("Method").select_option("tsv")
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
    page.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Enter")
    page.locator("#job-status", has_text="cancelled").wait_for(timeout=120_000)
    # the focus was on Cancel, now disabled: it moved to Retry, not to the page's body
    assert page.evaluate("document.activeElement.id") == "retry"
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


def failed_job(service: Service, minilm_inputs: Inputs, tmp_path: Path, vanish: int) -> str:
    """A job that passes the API's preflight, then fails in the worker: the first `vanish`
    task models lose their weights while the worker is held."""
    body = spec_body(minilm_inputs, tmp_path / f"out-{vanish}", name=f"fails-{vanish}")
    for i in range(vanish):
        task = tmp_path / f"vanishing-{vanish}-{i}"
        task.mkdir()
        for f in minilm_inputs.models[i].iterdir():
            (task / f.name).symlink_to(f)
        body["models"][i]["source"] = str(task)
    with service.client("submit") as http:
        service.workers[0].kill(signal.SIGSTOP)
        try:
            job_id = http.post("/v1/jobs", json=body).json()["id"]
            for i in range(vanish):
                (tmp_path / f"vanishing-{vanish}-{i}" / "model.safetensors").unlink()
        finally:
            service.workers[0].kill(signal.SIGCONT)
    assert service.wait_terminal(job_id).status == "failed"
    return job_id


def test_a_failed_job_shows_its_error_once(tab: Tab, service: Service, minilm_inputs: Inputs,
                                           tmp_path: Path) -> None:
    page = tab.page
    several = failed_job(service, minilm_inputs, tmp_path, vanish=2)
    one = failed_job(service, minilm_inputs, tmp_path, vanish=1)
    tab.goto(f"/jobs/{several}")
    tab.log_in("read")
    section = page.locator("#error-section")
    section.wait_for()
    assert page.locator("#error-type").inner_text() == "PreflightError"
    # the message's head, then each problem once, as a list naming its model
    assert page.locator("#error-message").inner_text() == "2 problems:"
    items = page.locator("#error-problems li").all_inner_texts()
    assert [item.split(":")[0] for item in items] == ["vanishing-2-0", "vanishing-2-1"], items
    assert all("model.safetensors" in item for item in items), items
    details = json.loads(page.locator("#error-details").text_content() or "{}")
    assert len(details["problems"]) == 2
    assert page.locator("#retry").is_enabled() and page.locator("#cancel").is_disabled()
    # times carry their zone (schedules' crons are in UTC; the browser may be elsewhere)
    queued = page.locator("#timeline li").first.inner_text()
    assert re.search(r"\d\d:\d\d:\d\d (UTC|GMT[+-]?[\d:]*|[A-Z]{2,5})\b", queued), queued
    tab.screenshot("1-several-problems")

    tab.goto(f"/jobs/{one}")
    page.locator("#error-section").wait_for()
    message = page.locator("#error-message").inner_text()
    assert message.startswith("vanishing-1-0: ") and "model.safetensors" in message
    expect(page.locator("#error-problems li")).to_have_count(0)  # not said twice
    tab.screenshot("2-one-problem")


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

    # the problems belong to the text checked: once it is edited the panel says they may not
    # hold any more, until the next check (an edit back to that text makes them current again)
    stale = page.locator("#check-stale")
    assert stale.count() == 0
    page.get_by_label("Job spec (YAML or JSON)").press("End")
    page.keyboard.type("#")
    expect(stale).to_have_text("The spec has changed since this check.")
    page.keyboard.press("Backspace")
    expect(stale).to_have_count(0)
    page.get_by_label("Job spec (YAML or JSON)").fill(text)
    expect(stale).to_be_visible()
    page.get_by_role("button", name="Check").click()
    page.locator("#problems li", has_text="missing-model").wait_for()
    expect(stale).to_have_count(0)



def test_a_key_that_may_not_submit_is_not_a_spec_problem(tab: Tab, service: Service) -> None:
    page = tab.page
    tab.goto("/new")
    tab.log_in("read")
    editor = page.get_by_label("Job spec (YAML or JSON)")
    editor.fill("name: x\n")  # a bad spec: a check with a submit key lists its problems
    page.get_by_role("button", name="Check").click()
    page.locator("#check-result", has_text="'submit' is needed").wait_for()
    # the refusal is shown, and the spec is not marked invalid for it (nor listed as wrong)
    assert editor.get_attribute("aria-invalid") is None
    assert page.locator("#problems li").count() == 0
    tab.screenshot("refused")

def test_a_double_click_on_submit_queues_one_job(tab: Tab, service: Service,
                                                 minilm_inputs: Inputs, tmp_path: Path) -> None:
    page = tab.page
    tab.goto("/new")
    tab.log_in("submit")
    name = f"double-{secrets.token_hex(3)}"
    # the gpu queue: no worker serves it here, the job waits (and is cancelled at the end)
    body = spec_body(minilm_inputs, tmp_path / "once", name=name, options={"device": "cuda"})
    page.get_by_label("Job spec (YAML or JSON)").fill(yaml.safe_dump(body, sort_keys=False))
    page.get_by_role("button", name="Submit").dblclick()
    page.wait_for_url(JOB_URL)
    page.locator("#job-status", has_text="queued").wait_for()
    with service.client("submit") as http:
        jobs = http.get("/v1/jobs", params={"name": name}).json()["jobs"]
        assert [j["id"] for j in jobs] == [JOB_URL.match(page.url).group(1)]  # type: ignore[union-attr]
        assert http.post(f"/v1/jobs/{jobs[0]['id']}/cancel").status_code == 202

class Requests:
    """The API requests a page makes: the job list reads, the event streams (with their
    Last-Event-ID), the single job reads."""

    def __init__(self, tab: Tab) -> None:
        self.seen: list[tuple[str, str | None]] = []
        tab.page.on("request", lambda r: self.seen.append(
            (r.url.removeprefix(tab.base_url), r.headers.get("last-event-id"))))

    def lists(self) -> int:
        return sum(1 for path, _ in self.seen if path == "/v1/jobs" or
                   path.startswith("/v1/jobs?"))

    def streams(self) -> list[str | None]:
        return [last for path, last in self.seen if path == "/v1/events"]


# the job rows' progress (bar value and text) every time it changes, to tell a live list from
# one read again now and then
ROWS_WATCH = """() => {
  window.__rows = [];
  const note = () => {
    for (const tr of document.querySelectorAll('#jobs tbody tr')) {
      const seen = [tr.dataset.id, tr.querySelector('progress').value,
                    tr.querySelector('td.progress .sub').textContent];
      const last = window.__rows.findLast(r => r[0] === seen[0]);
      if (!last || last[1] !== seen[1] || last[2] !== seen[2]) window.__rows.push(seen);
    }
  };
  new MutationObserver(note).observe(document.querySelector('#jobs tbody'),
    {childList: true, characterData: true, attributes: true, subtree: true});
}"""


def test_jobs_list_updates_itself_and_filters(tab: Tab, service: Service,
                                              minilm_inputs: Inputs, tmp_path: Path) -> None:
    page = tab.page
    requests = Requests(tab)
    tab.goto("/")
    assert "Enter an API key" in page.locator("#jobs-status").inner_text()
    page.get_by_label("API key").fill("not-a-key-of-this-server")
    page.get_by_role("button", name="Use key").click()
    page.locator("#notice", has_text="refused").wait_for()
    tab.log_in("read")
    page.locator("#jobs-status", has_text="job").wait_for()
    page.locator("#stream-state[data-state=live]", has_text="Live").wait_for()
    page.evaluate("window.__sameDocument = true")
    page.evaluate(ROWS_WATCH)
    lists_before, streams_before = requests.lists(), len(requests.streams())
    started = time.monotonic()

    # a job submitted elsewhere appears and finishes without a reload, through the stream
    http = service.client("submit")
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
    # no polling: the list was not read again (but for the fallback read once a minute), the
    # one stream stayed open, and the row went through the progress the worker reported
    assert requests.lists() - lists_before <= 1 + (time.monotonic() - started) // 60
    assert len(requests.streams()) == streams_before
    progress = [r for r in page.evaluate("window.__rows") if r[0] == job_id]
    assert len({text for _, _, text in progress}) >= 4, progress
    assert len({value for _, value, _ in progress if 0 < value < 1}) >= 2, progress
    assert service.store.get(job_id).progress.total > 0  # type: ignore[union-attr]

    # a dropped stream: "Reconnecting…" while it is down, then it resumes after the last
    # event it had (Last-Event-ID) and what happens next arrives as before
    page.route("**/v1/events", lambda route: route.abort())
    page.get_by_label("Live updates").uncheck()
    expect(page.locator("#stream-state")).to_have_text("Paused")
    page.get_by_label("Live updates").check()
    reconnecting = page.locator("#stream-state[data-state=reconnecting]")
    reconnecting.wait_for()
    assert reconnecting.inner_text() == "Reconnecting…" and reconnecting.is_visible()
    page.unroute("**/v1/events")
    page.locator("#stream-state[data-state=live]").wait_for()
    terminal = [i for i, f in service.store.r.xrange(service.store.all_events_key())
                if f["job"] == job_id][-1]
    resumed = requests.streams()[-1]
    assert resumed is not None and resumed >= terminal, (resumed, terminal)
    waiting = http.post("/v1/jobs", json=spec_body(
        minilm_inputs, tmp_path / "waits", name="listed-waiting", options={"device": "cuda"}))
    assert waiting.status_code == 202, waiting.text  # the gpu queue: no worker serves it here
    waiting_id = waiting.json()["id"]
    page.locator(f"tr[data-id='{waiting_id}'][data-status='queued']").wait_for(timeout=10_000)
    assert http.post(f"/v1/jobs/{waiting_id}/cancel").status_code == 202
    page.locator(f"tr[data-id='{waiting_id}'][data-status='cancelled']").wait_for(
        timeout=10_000)
    assert page.locator("#jobs-announce").inner_text() == "Job listed-waiting: cancelled."
    http.close()

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


def test_jobs_list_keeps_loaded_pages_when_new_jobs_come(tab: Tab, service: Service,
                                                         minilm_inputs: Inputs,
                                                         tmp_path: Path) -> None:
    """After "Load more", a new job on top must not push the job at the old page boundary
    off the list: every loaded row stays."""
    page = tab.page
    name = f"paged-{secrets.token_hex(3)}"
    http = service.client("submit")

    def submit(n: int) -> str:
        # the gpu queue: no worker serves it here, the jobs wait (and are cancelled at the end)
        response = http.post("/v1/jobs", json=spec_body(
            minilm_inputs, tmp_path / f"o{n}", name=name, options={"device": "cuda"}))
        assert response.status_code == 202, response.text
        return response.json()["id"]

    ids = [submit(n) for n in range(26)]  # one page of 25 and one more
    tab.goto("/")
    tab.log_in("read")
    page.get_by_label("Name").fill(name)
    page.get_by_role("button", name="Apply").click()
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(25)
    page.get_by_role("button", name="Load more").focus()
    page.keyboard.press("Enter")
    expect(rows).to_have_count(26)
    assert page.get_by_role("button", name="Load more").is_hidden()
    # the hidden button had the focus: the job the last page brought has it now
    assert page.evaluate("document.activeElement.getAttribute('href')") == f"/jobs/{ids[0]}"
    page.locator("#stream-state[data-state=live]").wait_for()
    newest = submit(26)
    page.locator(f"tr[data-id='{newest}']").wait_for(timeout=10_000)
    expect(rows).to_have_count(27)
    shown = rows.evaluate_all("rs => rs.map(r => r.dataset.id)")
    assert shown == [newest, *reversed(ids)]
    for job_id in [*ids, newest]:
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    expect(page.locator("tbody tr[data-status='cancelled']")).to_have_count(27)
    http.close()


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
