"""The Schedules page in a real headless Chromium against the real API, worker and Redis:
create (and see the problems of a bad schedule), run now (a job, then a skip when nothing
changed), the run history with its job link, pause and resume, delete. The ticks here are the
API's "run now" (the schedule's own period is a day: no scheduler process is involved).
The page refreshes itself every 5 s: a refresh never moves the focus (two schedules of the
same name included), and a refused key stops the refreshing instead of pulling the focus to
the key field at each one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.dashboard.conftest import Tab
from tests.service.conftest import Service

pytestmark = pytest.mark.slow

MARK_FOCUS = "() => { window.__focused = document.activeElement; }"
SAME_FOCUS = "() => document.activeElement === window.__focused"


def next_poll(page: Page, path: str = "/v1/schedules") -> None:
    """Wait for the page's next refresh (a GET of `path`) to be answered and drawn."""
    with page.expect_response(lambda r: r.url.endswith(path) and r.request.method == "GET",
                              timeout=15_000):
        pass
    page.wait_for_timeout(300)


def schedule_body(name: str, base: Path, collection: Path, out: Path) -> dict[str, Any]:
    return {"name": name, "base": str(base), "collection": {"directory": str(collection)},
            "template": {"method": {"name": "task_arithmetic"}, "output": {"format": "lora"},
                         "options": {"device": "cpu"}},
            "destination": str(out), "every_seconds": 86400}


def test_create_run_now_history_pause_and_delete(tab: Tab, service: Service, minilm_dir: Path,
                                                 minilm_adapters: dict[str, Path],
                                                 tmp_path: Path) -> None:
    page = tab.page
    collection = tmp_path / "adapters"
    for name in ("qv", "pattern"):
        shutil.copytree(minilm_adapters[name], collection / name)
    (collection / "notes").mkdir()  # not an adapter: listed as ignored in the history
    out = tmp_path / "out"
    tab.goto("/schedules")
    tab.log_in("submit")
    page.locator("#s-method option[value=task_arithmetic]").wait_for(state="attached")

    form = page.locator("#create")
    form.get_by_label("Name", exact=True).fill("nightly-ui")
    form.get_by_label("Runs").select_option("every_seconds")
    form.get_by_label("Every (seconds)").fill("86400")
    form.get_by_label("Base model", exact=False).fill(str(minilm_dir))
    form.get_by_label("Collection", exact=True).select_option("directory")
    form.get_by_label("Directory (absolute)").fill(str(collection))
    form.get_by_label("Output format").select_option("lora")
    form.get_by_label("Device").select_option("cpu")
    # a relative destination and an unknown method parameter: refused, each problem listed
    form.get_by_label("Method parameters (JSON)").fill('{"lamda": 2}')
    form.get_by_label("Destination").fill("relative/out")
    form.get_by_role("button", name="Create schedule").click()
    problems = page.locator("#create-problems li")
    problems.first.wait_for()
    shown = " | ".join(problems.all_inner_texts())
    assert "destination must be hub://org/name or an absolute local directory" in shown, shown
    tab.screenshot("1-problems")
    form.get_by_label("Destination").fill(str(out))
    form.get_by_label("Hub token secret", exact=False).fill("no-such-secret")
    form.get_by_role("button", name="Create schedule").click()
    # that one had two problems; the schema error came first, now the method's, and the
    # secret that cannot be read
    page.locator("#create-problems li", has_text="lamda").wait_for()
    page.locator("#create-problems li",
                 has_text="cannot read the Hub token secret 'no-such-secret'").wait_for()
    form.get_by_label("Hub token secret", exact=False).fill("")
    form.get_by_label("Method parameters (JSON)").fill("{}")
    form.get_by_role("button", name="Create schedule").click()
    page.locator("#create-result .ok").wait_for()
    row = page.locator("#schedules tbody tr", has_text="nightly-ui")
    row.wait_for()
    schedule_id = row.get_attribute("data-id")
    assert "every 86400 s" in row.inner_text() and str(collection) in row.inner_text()
    assert "never run" in row.inner_text()

    # run now: a job merging both adapters, linked from the history
    row.get_by_role("button", name="Run now nightly-ui").click()
    page.locator("#schedules-status", has_text="run submitted").wait_for(timeout=60_000)
    history = page.locator("#runs tbody tr")
    history.first.wait_for()
    assert history.first.get_attribute("data-status") == "submitted"
    assert "pattern, qv" in history.first.inner_text()
    assert f"ignored: {collection / 'notes'} (not a LoRA adapter directory" \
        in history.first.inner_text()
    job_link = history.first.get_by_role("link")
    job_id = job_link.inner_text()
    job_link.focus()  # and kept there while the refreshes redraw the run as the job finishes
    record = service.wait_terminal(job_id, timeout=300)
    assert record.status == "succeeded", record.error
    history.first.locator(".badge.succeeded").last.wait_for()
    next_poll(page, f"/v1/schedules/{schedule_id}/runs?limit=50")
    assert page.evaluate("document.activeElement.getAttribute('href')") == f"/jobs/{job_id}"
    assert record.schedule_id == schedule_id
    tab.screenshot("2-run-submitted")

    # nothing changed: the next run is a skip, with its reason, and no job
    row.get_by_role("button", name="Run now nightly-ui").click()
    page.locator("#schedules-status", has_text="run skipped").wait_for(timeout=60_000)
    expect(history).to_have_count(2)
    assert history.first.get_attribute("data-status") == "skipped"
    assert "unchanged since the last successful run" in history.first.inner_text()
    assert history.nth(1).get_by_role("link").inner_text() == job_id
    last_run = row.locator("td.last-run").inner_text()
    assert "skipped" in last_run and "unchanged" in last_run and "object" not in last_run
    tab.screenshot("3-history")

    # the focus on a job link of the history stays there through a refresh
    history.nth(1).get_by_role("link").focus()
    page.evaluate(MARK_FOCUS)
    next_poll(page, f"/v1/schedules/{schedule_id}/runs?limit=50")
    assert page.evaluate(SAME_FOCUS)

    # pause, resume; the button pressed keeps the focus (it now says Resume)
    row.get_by_role("button", name="Pause nightly-ui").click()
    page.locator("#schedules tbody tr[data-paused=true]", has_text="nightly-ui").wait_for()
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == \
        "Resume nightly-ui"
    assert service.client("read").get(f"/v1/schedules/{schedule_id}"
                                      ).json()["paused"] is True
    page.get_by_role("button", name="Resume nightly-ui").click()
    page.locator("#schedules tbody tr[data-paused=false]", has_text="nightly-ui").wait_for()

    # the job link opens the job
    job_link = page.locator("#runs tbody tr").nth(1).get_by_role("link")
    job_link.click()
    page.wait_for_url(f"**/jobs/{job_id}")
    page.locator("#job-status", has_text="succeeded").wait_for()
    assert page.locator("#key-form").is_hidden()  # the same tab: the key is kept
    assert schedule_id in page.locator("#job-facts").inner_text()

    # delete
    page.go_back()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete nightly-ui").click()
    page.locator("#schedules-status", has_text="deleted").wait_for()
    expect(page.locator("#schedules tbody tr", has_text="nightly-ui")).to_have_count(0)
    assert service.client("read").get("/v1/schedules").json()["schedules"] == []


def test_a_refresh_keeps_the_focus_on_the_same_schedule(tab: Tab, service: Service,
                                                        minilm_dir: Path,
                                                        minilm_adapters: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """Two schedules named alike: the focus stays on the second one's button through the
    refreshes, and Enter acts on the second one."""
    page = tab.page
    collection = tmp_path / "adapters"
    shutil.copytree(minilm_adapters["qv"], collection / "qv")
    with service.client("submit") as http:
        ids = []
        for k in range(2):
            created = http.post("/v1/schedules", json=schedule_body(
                "twin", minilm_dir, collection, tmp_path / f"out{k}"))
            assert created.status_code == 201, created.text
            ids.append(created.json()["id"])
        try:
            tab.goto("/schedules")
            tab.log_in("submit")
            expect(page.locator("#schedules tbody tr", has_text="twin")).to_have_count(2)
            # newest first: the second one created is the first row
            second = page.locator(f"#schedules tbody tr[data-id='{ids[1]}']")
            first = page.locator(f"#schedules tbody tr[data-id='{ids[0]}']")
            first.get_by_role("button", name="Pause twin").focus()
            page.evaluate(MARK_FOCUS)
            next_poll(page)
            assert page.evaluate(SAME_FOCUS)
            assert page.evaluate("document.activeElement.closest('tr').dataset.id") == ids[0]

            page.keyboard.press("Enter")
            page.locator(f"#schedules tbody tr[data-id='{ids[0]}'][data-paused=true]").wait_for()
            assert http.get(f"/v1/schedules/{ids[0]}").json()["paused"] is True
            assert http.get(f"/v1/schedules/{ids[1]}").json()["paused"] is False
            # the same button, now "Resume", still has the focus, through a refresh as well
            assert page.evaluate(SAME_FOCUS)
            assert page.evaluate("document.activeElement.textContent") == "Resume"
            next_poll(page)
            assert page.evaluate(SAME_FOCUS)
            assert second.get_attribute("data-paused") == "false"
            tab.screenshot("twins")
        finally:
            for schedule_id in ids:
                http.delete(f"/v1/schedules/{schedule_id}")


def test_a_refused_key_stops_the_refresh_and_leaves_the_focus(tab: Tab, service: Service
                                                              ) -> None:
    page = tab.page
    tab.goto("/schedules")
    tab.log_in("read")
    page.locator("#s-method option[value=task_arithmetic]").wait_for(state="attached")
    next_poll(page)
    # the server no longer knows this tab's key (as after a key rotation)
    page.evaluate("sessionStorage.setItem('merge-service.api-key', 'rotated-away')")
    page.evaluate("""() => {
      window.__notices = [];
      const box = document.getElementById('notice');
      new MutationObserver(() => window.__notices.push(box.textContent))
        .observe(box, {childList: true, characterData: true, subtree: true});
    }""")
    name = page.get_by_label("Name", exact=True)
    name.click()
    page.keyboard.type("typing here")
    page.locator("#notice", has_text="refused").wait_for(timeout=15_000)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/v1/" in r.url else None)
    page.keyboard.type(" still")
    page.wait_for_timeout(11_000)  # two refresh periods
    assert requests == []  # the refresh stopped
    assert page.evaluate("document.activeElement.id") == "s-name"
    assert name.input_value() == "typing here still"
    assert len(page.evaluate("window.__notices")) == 1  # announced once
    assert page.locator("#key-form").is_visible()
    tab.screenshot("refused")

    # a key again: the list refreshes again
    tab.log_in("read")
    next_poll(page)
    assert page.locator("#notice").is_hidden()
    next_poll(page)


def test_switching_between_cron_and_seconds_keeps_the_console_quiet(tab: Tab,
                                                                    service: Service) -> None:
    page = tab.page
    warnings: list[str] = []
    page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
    tab.goto("/schedules")
    tab.log_in("submit")
    page.locator("#s-method option[value=task_arithmetic]").wait_for(state="attached")
    form = page.locator("#create")
    form.get_by_label("Runs").select_option("every_seconds")
    expect(form.get_by_label("Every (seconds)")).to_have_value("86400")
    assert form.get_by_label("Every (seconds)").get_attribute("type") == "number"
    form.get_by_label("Runs").select_option("cron")
    expect(form.get_by_label("Cron", exact=False)).to_have_value("0 2 * * *")
    assert warnings == [], warnings
