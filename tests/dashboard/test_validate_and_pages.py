"""`POST /v1/jobs:validate` (the spec editor's check) and the dashboard's pages and static
files, through the app in-process (`TestClient`) on a real Redis: no browser needed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from api.app import create_app
from tests.service.conftest import (  # noqa: F401  (fixtures, used by name)
    API_KEYS,
    KEYS,
    Inputs,
    minilm_inputs,
    redis_server,
    redis_url,
    service_settings,
    spec_body,
)
from workers.jobs import JobStore
from workers.redis_server import EmbeddedRedis

DB = 12


@pytest.fixture
def client(redis_server: EmbeddedRedis, tmp_path: Path  # noqa: F811
           ) -> Iterator[tuple[TestClient, JobStore]]:
    url = redis_url(redis_server, DB)
    store = JobStore.from_url(url)
    store.r.flushdb()
    app = create_app(service_settings(url, tmp_path / "data", api_keys=API_KEYS))
    with TestClient(app) as http:
        http.headers["Authorization"] = f"Bearer {KEYS['submit']}"
        yield http, store
    store.r.close()


def check(http: TestClient, text: str, media_type: str = "application/yaml") -> dict:
    response = http.post("/v1/jobs:validate", content=text.encode(),
                         headers={"Content-Type": media_type})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_valid_spec_is_parsed_and_resolved_and_nothing_is_queued(
        client: tuple[TestClient, JobStore], minilm_inputs: Inputs,  # noqa: F811
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    http, store = client
    monkeypatch.chdir(tmp_path)
    body = spec_body(minilm_inputs, "out/merged", method="ties", params={"density": 0.3})
    text = "# a comment, as people write them\n" + yaml.safe_dump(body, sort_keys=False)
    answer = check(http, text)
    assert answer["valid"] is True and answer["problems"] == []
    # `spec` is what was written (POST /v1/jobs takes it as it is), `resolved` what a job stores
    assert answer["spec"] == body
    assert answer["resolved"]["models"][0]["name"] == "ft_a"
    assert Path(answer["resolved"]["output"]["destination"]).is_absolute()
    assert store.counts() == dict.fromkeys(store.counts(), 0)
    assert not (tmp_path / "out").exists()
    # the same as JSON
    assert check(http, json.dumps(body), "application/json")["valid"] is True
    # and the parsed spec is accepted as it is by POST /v1/jobs
    created = http.post("/v1/jobs", json=answer["spec"])
    assert created.status_code == 202, created.text


def test_every_problem_is_reported_with_its_line(client: tuple[TestClient, JobStore],
                                                 minilm_inputs: Inputs,  # noqa: F811
                                                 tmp_path: Path) -> None:
    http, _ = client
    body = spec_body(minilm_inputs, tmp_path / "out", method="ties",
                     params={"density": 1.5, "lamda": 1})
    body["models"][1]["source"] = str(tmp_path / "nowhere")
    text = yaml.safe_dump(body, sort_keys=False)
    lines = text.splitlines()

    def line_of(fragment: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if fragment in line)

    answer = check(http, text)
    assert answer["valid"] is False and answer["resolved"] is None
    found = {(p["field"] or p["model"]): p for p in answer["problems"]}
    assert found["method.params.density"]["line"] == line_of("density:")
    assert found["method.params.lamda"]["message"].startswith("unknown parameter")
    assert found["method.params.lamda"]["line"] == line_of("lamda:")
    assert found["nowhere"]["line"] == line_of("nowhere")  # a model, found by its source
    assert "does not exist" in found["nowhere"]["message"]

    # a schema error (an unknown field) comes first, with what preflight finds in the rest;
    # the spec is not returned
    schema = check(http, text + "colour: blue\n")
    assert schema["valid"] is False and schema["spec"] is None
    assert [(p["field"], p["model"], p["line"]) for p in schema["problems"]] == [
        ("colour", None, len(lines) + 1),
        *((p["field"], p["model"], p["line"]) for p in answer["problems"])]
    # an invalid value: its default stands in for it while preflight checks the rest
    schema = check(http, text + "space: diagonal\n")
    assert schema["valid"] is False and schema["spec"] is None
    assert [(p["field"], p["model"], p["line"]) for p in schema["problems"]] == [
        ("space", None, len(lines) + 1),
        *((p["field"], p["model"], p["line"]) for p in answer["problems"])]
    # not YAML at all: one problem, at the line the parser stopped (the last at the end)
    broken = check(http, "base: [unclosed\n")
    assert broken["valid"] is False and "not valid YAML" in broken["problems"][0]["message"]
    assert broken["problems"][0]["line"] == 1
    [indented] = check(http, "base: x\nmodels: y\n  bad: z\nspace: core\n")["problems"]
    assert indented["line"] == 3 and "line 3, column" in indented["message"]
    [json_text] = check(http, '{"base": "x",\n "models": [1,\n}\n', "application/json")["problems"]
    assert json_text["line"] == 3
    assert check(http, "- a list\n")["problems"][0]["message"].startswith("the spec must be")


def test_content_types_and_roles(client: tuple[TestClient, JobStore]) -> None:
    http, _ = client
    refused = http.post("/v1/jobs:validate", content=b"base: x",
                        headers={"Content-Type": "application/octet-stream"})
    assert refused.status_code == 400
    assert "application/yaml" in refused.json()["error"]["message"]
    read_only = http.post("/v1/jobs:validate", content=b"base: x",
                          headers={"Content-Type": "application/yaml",
                                   "Authorization": f"Bearer {KEYS['read']}"})
    assert read_only.status_code == 403
    anonymous = http.post("/v1/jobs:validate", content=b"base: x",
                          headers={"Content-Type": "application/yaml", "Authorization": ""})
    assert anonymous.status_code == 401


def test_pages_and_static_files(client: tuple[TestClient, JobStore]) -> None:
    http, _ = client
    del http.headers["Authorization"]  # pages carry no data: they need no key
    for path, heading in (("/", "Jobs"), ("/new", "New merge"), ("/schedules", "Schedules"),
                          (f"/jobs/{'a' * 20}", "Job")):
        page = http.get(path)
        assert page.status_code == 200, path
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert f"<h1>{heading}" in page.text
        assert 'data-auth-required="true"' in page.text
        assert "<script>" not in page.text and "http://" not in page.text  # no inline, no CDN
    assert http.get("/jobs/not-an-id").status_code == 422
    for name, media in (("app.css", "text/css"), ("common.js", "text/javascript"),
                        ("charts.js", "text/javascript")):
        response = http.get(f"/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media)
    assert http.get("/static/.hidden").status_code == 404
    assert http.get("/static/..%2Fdashboard.py").status_code == 404
    assert http.get("/static/nothing.js").status_code == 404
