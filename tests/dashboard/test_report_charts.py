"""The merge report's charts for the methods whose reports carry other data than tsv's:
`rmm` (recovery error per task) and `adarank` (kept rank per layer and task as {task: rank},
the loss curve). Real jobs through the real worker, charts read in a real Chromium and compared
with `GET /v1/jobs/{id}/report`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.conftest import Tab
from tests.service.conftest import Inputs, Service, spec_body
from tests.test_adarank_models import minilm_tasks  # noqa: F401  (a fixture, used by name)

pytestmark = pytest.mark.slow


def run_job(service: Service, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    with service.client("submit") as http:
        created = http.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        record = service.wait_terminal(job_id, timeout=600)
        assert record.status == "succeeded", record.error
        return job_id, http.get(f"/v1/jobs/{job_id}/report").json()


def open_report(tab: Tab, job_id: str) -> None:
    tab.goto(f"/jobs/{job_id}")
    if tab.page.locator("#key-form").is_visible():
        tab.log_in("read")
    tab.page.locator("#report-section").wait_for()


def test_rmm_recovery_error_per_task(tab: Tab, service: Service, minilm_inputs: Inputs,
                                     tmp_path: Path) -> None:
    body = spec_body(minilm_inputs, tmp_path / "rmm", method="rmm", n_models=3, name="rmm",
                     params={"basis_size": 1}, options={"include": [r"layer\.0\."]})
    body["output"]["format"] = "reversible"
    job_id, report = run_job(service, body)
    errors = report["recovery"]["relative_error"]
    assert set(errors) == {"ft_a", "ft_b", "ft_c"} and all(0 < e < 1 for e in errors.values())

    open_report(tab, job_id)
    chart = tab.page.locator("#charts figure[data-chart=recovery]")
    bars = chart.locator("rect.bar")
    assert bars.count() == 3
    assert bars.evaluate_all("rs => rs.map(r => Number(r.dataset.value))") == \
        pytest.approx(list(errors.values()))
    assert chart.locator("svg text", has_text="ft_b").count() == 1
    for absent in ("interference", "spectra", "kept-rank", "loss"):
        assert tab.page.locator(f"#charts figure[data-chart={absent}]").count() == 0
    tab.screenshot("report")


def test_adarank_kept_ranks_and_loss_curve(tab: Tab, service: Service, minilm_dir: Path,
                                           minilm_tasks: dict[str, Path],  # noqa: F811
                                           tmp_path: Path) -> None:
    names = list(minilm_tasks)
    body = {
        "name": "adarank", "base": str(minilm_dir),
        "models": [{"source": str(p / "adapter"), "name": n} for n, p in minilm_tasks.items()],
        "method": {"name": "adarank", "params": {"steps": 6, "batch_size": 4}},
        "output": {"destination": str(tmp_path / "adarank")},
        "options": {"device": "cpu"},
        "calibration": {n: {"path": str(p / "calibration.jsonl")}
                        for n, p in minilm_tasks.items()},
    }
    job_id, report = run_job(service, body)
    curve = report["adarank"]["loss_curve"]
    assert len(curve) == 6
    matrices = [n for n, t in report["tensors"].items() if "kept_rank" in t]
    assert matrices

    open_report(tab, job_id)
    charts = tab.page.locator("#charts")
    loss = charts.locator("figure[data-chart=loss] path.series")
    assert loss.count() == 1 and loss.get_attribute("data-points") == "6"
    assert charts.locator("figure[data-chart=loss] tbody tr").count() == 6
    cells = charts.locator("figure[data-chart=kept-rank] rect.cell")
    assert cells.count() == len(matrices) * len(names)
    assert cells.evaluate_all("cs => cs.map(c => Number(c.dataset.value))") == \
        [report["tensors"][m]["kept_rank"][n] for m in matrices for n in names]
    header = charts.locator("figure[data-chart=kept-rank] thead th").evaluate_all(
        "ths => ths.map(th => th.textContent)")
    assert header == ["layer", *names]
    tab.screenshot("report")
