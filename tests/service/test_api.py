"""The API alone (in-process, real Redis, no worker): validation at submit, bad requests,
listing and pagination, idempotency, cancel and retry of queued jobs, auth roles, OpenAPI."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.service import JobService
from merge_service.cli import main as cli
from tests.service.conftest import (
    API_KEYS,
    KEYS,
    Inputs,
    redis_url,
    service_settings,
    spec_body,
)
from workers.jobs import JobStore
from workers.redis_server import EmbeddedRedis, free_port

DB = 2


@pytest.fixture
def store(redis_server: EmbeddedRedis) -> Iterator[JobStore]:
    store = JobStore.from_url(redis_url(redis_server, DB))
    store.r.flushdb()
    yield store
    store.r.close()


def make_client(redis_server: EmbeddedRedis, tmp_path: Path, **settings: Any) -> TestClient:
    app = create_app(service_settings(redis_url(redis_server, DB), tmp_path / "data",
                                      **settings))
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=True)


@pytest.fixture
def client(redis_server: EmbeddedRedis, store: JobStore, tmp_path: Path
           ) -> Iterator[TestClient]:
    """Local mode: no keys."""
    with make_client(redis_server, tmp_path) as client:
        yield client


@pytest.fixture
def keyed(redis_server: EmbeddedRedis, store: JobStore, tmp_path: Path
          ) -> Iterator[TestClient]:
    with make_client(redis_server, tmp_path, api_keys=API_KEYS) as client:
        yield client


def queued_messages(store: JobStore, queue: str = "cpu") -> int:
    return store.r.llen(queue)


def error(response: Any) -> dict[str, Any]:
    return response.json()["error"]


# --- submit: validation before anything is queued ---------------------------------------------

def test_submit_queues_a_valid_spec(client: TestClient, store: JobStore,
                                    minilm_inputs: Inputs, tmp_path: Path) -> None:
    body = spec_body(minilm_inputs, "relative/out", name="ok")
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["name"] == "ok"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    # stored resolved: local paths absolute, the user's device kept
    assert Path(job["spec"]["output"]["destination"]).is_absolute()
    assert job["spec"]["base"] == str(minilm_inputs.base)
    assert [m["name"] for m in job["spec"]["models"]] == ["ft_a", "ft_b"]
    assert job["progress"] == {"stage": None, "done": 0, "total": 0, "current": None}
    assert {k: job[k] for k in ("started_at", "finished_at", "worker", "result", "error",
                                "schedule_id")} == dict.fromkeys(
        ("started_at", "finished_at", "worker", "result", "error", "schedule_id"))
    assert queued_messages(store) == 1
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_every_preflight_problem_is_listed_and_nothing_queued(
        client: TestClient, store: JobStore, minilm_inputs: Inputs, tmp_path: Path) -> None:
    existing = tmp_path / "exists"
    existing.mkdir()
    body = spec_body(minilm_inputs, existing, params={"bogus": 1})
    body["models"].append({"source": str(tmp_path / "missing")})
    body["method"]["name"] = "tsv"
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    err = error(response)
    assert err["type"] == "PreflightError"
    fields = {(p["field"], p["model"]) for p in err["problems"]}
    assert ("output.destination", None) in fields
    assert ("method.params.bogus", None) in fields
    assert (None, "missing") in fields
    assert queued_messages(store) == 0
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_unknown_fields_are_each_reported(client: TestClient, store: JobStore,
                                          minilm_inputs: Inputs) -> None:
    body = spec_body(minilm_inputs, "/tmp/x")
    body["models"][0]["wieght"] = 2
    body["outptu"] = {}
    body["options"] = {"device": "tpu"}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    err = error(response)
    assert err["type"] == "SpecError"
    by_field = {p["field"]: p["message"] for p in err["problems"]}
    assert by_field["models.0.wieght"] == "unknown field"
    assert by_field["outptu"] == "unknown field"
    assert "options.device" in by_field
    assert queued_messages(store) == 0


def test_a_typo_does_not_hide_the_other_problems(client: TestClient, store: JobStore,
                                                 minilm_inputs: Inputs, tmp_path: Path) -> None:
    """The spec less its unknown fields and invalid values is preflighted too: one 422 lists
    every problem, on submit and in the spec editor's check."""
    body = spec_body(minilm_inputs, tmp_path / "out", params={"alpah": 0.3})
    body["models"][0]["wieght"] = 2
    body["models"][1]["weight"] = "heavy"  # an invalid value: its default stands in for it
    body["models"].append({"source": str(tmp_path / "missing")})
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    err = error(response)
    assert err["type"] == "SpecError"
    found = {(p["field"], p["model"], p["message"].split(" (")[0]) for p in err["problems"]}
    assert {("models.0.wieght", None, "unknown field"),
            ("models.1.weight", None,
             "Input should be a valid number, unable to parse string as a number"),
            ("method.params.alpah", None, "unknown parameter")} <= found
    assert any(model == "missing" and "does not exist" in message
               for _, model, message in found), found
    assert len(found) == 4
    assert queued_messages(store) == 0
    checked = client.post("/v1/jobs:validate", json=body).json()
    assert not checked["valid"]
    assert {(p["field"], p["model"]) for p in checked["problems"]} == \
        {(field, model) for field, model, _ in found}


def test_nan_and_infinity_are_refused(client: TestClient, store: JobStore,
                                      minilm_inputs: Inputs, tmp_path: Path) -> None:
    """JSON's NaN and Infinity (which Python's parser reads) would be stored as null."""
    body = spec_body(minilm_inputs, tmp_path / "out", params={"alpha": float("inf")})
    response = client.post("/v1/jobs", content=json.dumps(body),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert [(p["field"], p["message"]) for p in error(response)["problems"]] == [
        ("method.params.alpha", "Input should be a finite number (method task_arithmetic)")]
    body["models"][0]["weight"] = float("nan")
    response = client.post("/v1/jobs", content=json.dumps(body),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert [(p["field"], p["message"]) for p in error(response)["problems"]] == [
        ("models.0.weight", "Input should be a finite number"),  # and what it did not hide:
        ("method.params.alpha", "Input should be a finite number (method task_arithmetic)")]
    assert queued_messages(store) == 0


def test_hostile_specs_are_refused_cheaply(client: TestClient, store: JobStore) -> None:
    """A few hundred bytes of nested YAML aliases expand to 10**10 values; a deeply nested
    body overflows a recursive parser. Each is a clear answer, not work or a 500."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    bomb = "\n".join(lines) + "\nbase: *l9\n"
    checked = client.post("/v1/jobs:validate", content=bomb,
                          headers={"Content-Type": "application/yaml"})
    assert checked.status_code == 200
    [problem] = checked.json()["problems"]
    assert "expands to more than 100000 values" in problem["message"]
    deep = '{"base": ' + "[" * 50_000 + "]" * 50_000 + "}"
    checked = client.post("/v1/jobs:validate", content=deep,
                          headers={"Content-Type": "application/json"})
    assert [p["message"] for p in checked.json()["problems"]] == ["the spec is nested too deeply"]
    for path in ("/v1/jobs", "/v1/schedules"):
        response = client.post(path, content=deep, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert error(response)["type"] == "BadRequest"
    assert queued_messages(store) == 0


def test_a_bug_is_a_500_in_the_error_shape(redis_server: EmbeddedRedis, store: JobStore,
                                           tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No plain-text answer, and nothing of the exception's text in it (a fault injected where
    no input reaches one)."""
    app = create_app(service_settings(redis_url(redis_server, DB), tmp_path / "data"))

    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(JobService, "methods", staticmethod(broken))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as http:
        response = http.get("/v1/methods")
    assert response.status_code == 500
    assert response.json() == {"error": {"type": "InternalError", "problems": [],
                                         "message": "internal error; the server's log has "
                                                    "the details"}}
    assert "secret internals" not in response.text


def test_too_few_models_and_missing_body(client: TestClient, minilm_inputs: Inputs) -> None:
    body = spec_body(minilm_inputs, "/tmp/x", n_models=1)
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert error(response)["problems"][0] == {"message": "a merge needs at least 2 models",
                                              "model": None, "tensor": None, "field": "models"}
    response = client.post("/v1/jobs")
    assert response.status_code == 422
    assert "required" in error(response)["problems"][0]["message"]


@pytest.mark.parametrize("content, headers", [
    (b'{"base": "x", "models": [', {"Content-Type": "application/json"}),
    (b'[{"base": "x"}]', {"Content-Type": "application/json"}),
    (b'"base: x"', {"Content-Type": "application/json"}),
    (b"42", {"Content-Type": "application/json"}),
    (b"base: x", {"Content-Type": "application/json"}),
    (b'{"base": "x"}', {"Content-Type": "text/plain"}),
])
def test_malformed_json_is_a_400(client: TestClient, store: JobStore, content: bytes,
                                 headers: dict[str, str]) -> None:
    response = client.post("/v1/jobs", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert error(response)["type"] == "BadRequest"
    assert "JSON" in error(response)["message"]
    assert queued_messages(store) == 0


def test_a_key_given_twice_is_a_422(client: TestClient, store: JobStore,
                                    minilm_inputs: Inputs, tmp_path: Path) -> None:
    """As in a spec file: a second `method` must not silently replace the first."""
    body = json.dumps(spec_body(minilm_inputs, tmp_path / "out"))
    twice = body[:-1] + ', "method": {"name": "ties"}}'
    response = client.post("/v1/jobs", content=twice,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert error(response)["problems"][0]["message"] == \
        "the key 'method' is given twice in one object"
    assert queued_messages(store) == 0
    schedule = client.post("/v1/schedules", content='{"name": "a", "name": "b"}',
                           headers={"Content-Type": "application/json"})
    assert schedule.status_code == 422
    assert error(schedule)["problems"][0]["message"] == \
        "the key 'name' is given twice in one object"


def test_oversized_bodies_are_refused(redis_server: EmbeddedRedis, store: JobStore,
                                      tmp_path: Path) -> None:
    with make_client(redis_server, tmp_path, max_request_bytes=4096) as client:
        big = {"base": "x" * 5000, "models": [], "method": {"name": "ties"}}
        response = client.post("/v1/jobs", json=big)  # declared by Content-Length
        assert response.status_code == 413
        assert error(response)["type"] == "PayloadTooLarge"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"base": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        response = client.post("/v1/jobs", content=chunks(),
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 413
    assert queued_messages(store) == 0


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/jobs/{id}"), ("GET", "/v1/jobs/{id}/events"), ("GET", "/v1/jobs/{id}/report"),
    ("POST", "/v1/jobs/{id}/cancel"), ("POST", "/v1/jobs/{id}/retry"),
])
@pytest.mark.parametrize("job_id", ["0123456789abcdef0123", "not-a-job", "x" * 64])
def test_unknown_job_is_a_404(client: TestClient, method: str, path: str, job_id: str) -> None:
    response = client.request(method, path.format(id=job_id))
    assert response.status_code == 404
    assert error(response)["type"] == "NotFound"


@pytest.mark.parametrize("cursor", ["garbage", "0123", "ZZZZZZZZZZZZZZZZZZZZ", "' OR 1=1"])
def test_invalid_cursor_is_a_400(client: TestClient, cursor: str) -> None:
    response = client.get("/v1/jobs", params={"cursor": cursor})
    assert response.status_code == 400
    assert "cursor" in error(response)["message"]


def test_invalid_query_parameters_are_422(client: TestClient) -> None:
    response = client.get("/v1/jobs", params={"status": "sleeping", "limit": 0})
    assert response.status_code == 422
    assert error(response)["type"] == "InvalidRequest"  # not a spec's problem
    fields = {p["field"] for p in error(response)["problems"]}
    assert fields == {"query.status", "query.limit"}


@pytest.mark.parametrize("event_id", ["abc", "18446744073709551616-0", "1-18446744073709551616"])
def test_invalid_last_event_id_is_a_400(client: TestClient, minilm_inputs: Inputs,
                                        tmp_path: Path, event_id: str) -> None:
    """Out of Redis's range too: a 200 with "unavailable" would have the browser reconnect
    with it forever."""
    job = client.post("/v1/jobs", json=spec_body(minilm_inputs, tmp_path / "o")).json()
    for path in (f"/v1/jobs/{job['id']}/events", "/v1/events"):
        response = client.get(path, headers={"Last-Event-ID": event_id})
        assert response.status_code == 400, path
        assert error(response)["type"] == "BadRequest"
    client.post(f"/v1/jobs/{job['id']}/cancel")  # ended: its stream ends after the replay
    largest = client.get(f"/v1/jobs/{job['id']}/events",  # in range: a valid, late id
                         headers={"Last-Event-ID": f"{2**64 - 1}-{2**64 - 1}"})
    assert largest.status_code == 200


def test_unknown_route_has_the_error_shape(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert error(response)["type"] == "NotFound"


def test_local_roots_confine_the_paths_a_spec_may_use(redis_server: EmbeddedRedis,
                                                     store: JobStore, minilm_inputs: Inputs,
                                                     tmp_path: Path) -> None:
    """With MERGE_SERVICE_LOCAL_ROOTS, a spec reads and writes under those directories only,
    links followed; submitting and validating refuse the rest before opening anything."""
    allowed = tmp_path / "allowed"
    (tmp_path / "elsewhere").mkdir()
    allowed.mkdir()
    (allowed / "link").symlink_to(tmp_path / "elsewhere")
    inputs = [minilm_inputs.base, *minilm_inputs.models[:2]]
    roots = ",".join(str(p) for p in [allowed, *inputs])
    with make_client(redis_server, tmp_path, local_roots=roots) as client:
        inside = client.post("/v1/jobs", json=spec_body(minilm_inputs, allowed / "out"))
        assert inside.status_code == 202, inside.text

        for destination in (tmp_path / "elsewhere" / "out", allowed / "link" / "out",
                            allowed / ".." / "out", "relative/out"):
            response = client.post("/v1/jobs", json=spec_body(minilm_inputs, destination))
            assert response.status_code == 422, (destination, response.text)
            [problem] = error(response)["problems"]
            assert problem["field"] == "output.destination"
            assert "outside the directories this service may use" in problem["message"]
            assert str(allowed) in problem["message"]

        body = spec_body(minilm_inputs, allowed / "out2", n_models=3,
                         calibration={"a": {"path": "/etc/hostname"}})
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422
        assert {p["field"] for p in error(response)["problems"]} == \
            {"models.2.source", "calibration.a.path"}

        checked = client.post("/v1/jobs:validate", json=spec_body(minilm_inputs, "/tmp/out"))
        assert checked.status_code == 200
        assert not checked.json()["valid"]
        assert checked.json()["problems"][0]["field"] == "output.destination"
    assert queued_messages(store) == 1  # the one inside
    assert not (tmp_path / "elsewhere" / "out").exists()


# --- listing ------------------------------------------------------------------------------------

def test_list_newest_first_with_filters_and_cursor(client: TestClient, minilm_inputs: Inputs,
                                                   tmp_path: Path) -> None:
    ids = []
    for i in range(7):
        body = spec_body(minilm_inputs, tmp_path / f"out{i}", name="even" if i % 2 == 0
                         else "odd")
        ids.append(client.post("/v1/jobs", json=body).json()["id"])
    client.post(f"/v1/jobs/{ids[2]}/cancel")
    client.post(f"/v1/jobs/{ids[4]}/cancel")
    newest_first = ids[::-1]

    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 3, **({"cursor": cursor} if cursor
                                                             else {})}).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["jobs"]) == 3
    assert seen == newest_first

    def listed(**params: Any) -> list[str]:
        out, cursor = [], None
        while True:
            page = client.get("/v1/jobs", params={**params, "limit": 2,
                                                   **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200, page.text
            out += [j["id"] for j in page.json()["jobs"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                return out

    assert listed(status="cancelled") == [ids[4], ids[2]]
    assert listed(status="queued") == [i for i in newest_first if i not in (ids[2], ids[4])]
    assert listed(name="odd") == [ids[5], ids[3], ids[1]]
    assert listed(name="even", status="queued") == [ids[6], ids[0]]
    assert listed(name="even", status="cancelled") == [ids[4], ids[2]]
    assert listed(name="nobody") == []


# --- idempotency, cancel, retry, report -----------------------------------------------------------

def test_idempotency_key_returns_the_same_job(client: TestClient, store: JobStore,
                                              minilm_inputs: Inputs, tmp_path: Path) -> None:
    body = spec_body(minilm_inputs, tmp_path / "out")
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert queued_messages(store) == 1
    other = dict(body, name="different")
    conflict = client.post("/v1/jobs", json=other, headers={"Idempotency-Key": "abc-1"})
    assert conflict.status_code == 409
    assert error(conflict)["type"] == "IdempotencyConflict"
    fresh = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-2"})
    assert fresh.json()["id"] != first.json()["id"]
    assert queued_messages(store) == 2


def test_cancel_a_queued_job_then_retry_it(client: TestClient, store: JobStore,
                                           minilm_inputs: Inputs, tmp_path: Path) -> None:
    job = client.post("/v1/jobs", json=spec_body(minilm_inputs, tmp_path / "out")).json()
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409  # not finished
    assert client.get(f"/v1/jobs/{job['id']}/report").status_code == 409
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    retried = client.post(f"/v1/jobs/{job['id']}/retry")
    assert retried.status_code == 202
    assert retried.json()["id"] != job["id"]
    assert retried.json()["spec"] == job["spec"]
    assert retried.json()["status"] == "queued"
    # the SSE stream of a finished job replays its events and ends
    response = client.get(f"/v1/jobs/{job['id']}/events")
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert [e["status"] for e in events] == ["queued", "cancelled"]


def held_and_orphan(client: TestClient, store: JobStore, inputs: Inputs, tmp_path: Path,
                    status: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two jobs in `status`: the first one's lock held by a worker, the other's by none (its
    worker died)."""
    jobs = [client.post("/v1/jobs", json=spec_body(inputs, tmp_path / name)).json()
            for name in ("a", "b")]
    for job in jobs:
        assert store.transition(job["id"], status, {"queued"}) is not None
    assert store.acquire_lock(jobs[0]["id"], "w1:123", ttl_s=60)
    return jobs[0], jobs[1]


def test_cancel_of_a_job_whose_worker_died_ends_it_at_once(
        client: TestClient, store: JobStore, minilm_inputs: Inputs, tmp_path: Path) -> None:
    """Running, and no worker holds its lock (the worker died): nothing would act on the
    cancel until a worker came back, so it is cancelled now. With the lock held, the worker
    is asked and the job stays running until it stops."""
    held, orphan = held_and_orphan(client, store, minilm_inputs, tmp_path, "running")
    answer = client.post(f"/v1/jobs/{orphan['id']}/cancel")
    assert answer.status_code == 202
    assert answer.json()["status"] == "cancelled" and answer.json()["finished_at"]
    answer = client.post(f"/v1/jobs/{held['id']}/cancel")
    assert answer.status_code == 202
    assert answer.json()["status"] == "running"
    assert store.cancel_requested(held["id"])


def test_a_job_pushing_to_the_hub_is_not_cancelled(
        client: TestClient, store: JobStore, minilm_inputs: Inputs, tmp_path: Path) -> None:
    """The upload is one commit, past the engine's last cancel check: a cancel of a job that
    a worker is pushing is a 409 (it would read `cancelled` while the commit lands). One
    whose worker died while pushing is cancelled at once, as any orphan."""
    held, orphan = held_and_orphan(client, store, minilm_inputs, tmp_path, "pushing")
    answer = client.post(f"/v1/jobs/{held['id']}/cancel")
    assert answer.status_code == 409
    assert "pushing its output to the Hub" in error(answer)["message"]
    assert not store.cancel_requested(held["id"])
    assert client.get(f"/v1/jobs/{held['id']}").json()["status"] == "pushing"
    answer = client.post(f"/v1/jobs/{orphan['id']}/cancel")
    assert answer.status_code == 202 and answer.json()["status"] == "cancelled"


def test_queue_routing(client: TestClient, store: JobStore, minilm_inputs: Inputs,
                       tmp_path: Path) -> None:
    def queue_of(device: str, n: int) -> str:
        body = spec_body(minilm_inputs, tmp_path / f"o{n}", options={"device": device})
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text  # the API host needs no GPU
        return store.internal(response.json()["id"])["queue"]

    assert queue_of("cpu", 0) == "cpu"
    assert queue_of("cuda", 1) == "gpu"
    assert queue_of("cuda:1", 2) == "gpu"
    assert queue_of("auto", 3) == "cpu"  # no worker consumes gpu
    store.worker_heartbeat("gpu-worker@test", {"name": "gpu-worker@test", "hostname": "h",
                                               "pid": 1, "queues": ["gpu", "cpu"],
                                               "started_at": "now"}, ttl_s=30)
    assert queue_of("auto", 4) == "gpu"
    assert store.r.llen("gpu") == 3 and store.r.llen("cpu") == 2


def test_methods_health_readiness_metrics(client: TestClient, store: JobStore) -> None:
    methods = client.get("/v1/methods").json()
    assert {"tsv", "ties", "iso_cts"} <= {m["name"] for m in methods}
    by_name = {m["name"]: m for m in methods}
    assert by_name["rmm"]["spaces"] == ["core", "full"] and by_name["rmm"]["weights"] is False
    assert by_name["tsv"]["spaces"] == ["core", "full", "knots"] and by_name["tsv"]["weights"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["problems"] == ["no live worker"]
    store.worker_heartbeat("w@test", {"name": "w@test", "hostname": "h", "pid": 1,
                                      "queues": ["cpu"], "started_at": "now"}, ttl_s=30)
    assert client.get("/readyz").status_code == 200
    for invented in ("BREW", "X-123"):  # methods a client invents share one label value
        assert client.request(invented, "/healthz").status_code == 405
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'merge_service_jobs{status="queued"}' in text
    assert 'merge_service_workers{queue="cpu"} 1.0' in text
    assert 'merge_service_http_requests_total{method="GET",route="/readyz",status="503"} 1.0' \
        in text
    assert 'merge_service_http_requests_total{method="other",route="/healthz",status="405"} 2.0' \
        in text and "BREW" not in text


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    operations = {(method.upper(), path): op["operationId"]
                  for path, item in doc["paths"].items() for method, op in item.items()}
    assert operations == {
        ("POST", "/v1/jobs"): "create_job", ("GET", "/v1/jobs"): "list_jobs",
        ("GET", "/v1/jobs/{job_id}"): "get_job",
        ("GET", "/v1/jobs/{job_id}/events"): "get_job_events",
        ("GET", "/v1/events"): "get_all_events",
        ("GET", "/v1/jobs/{job_id}/report"): "get_job_report",
        ("POST", "/v1/jobs/{job_id}/cancel"): "cancel_job",
        ("POST", "/v1/jobs/{job_id}/retry"): "retry_job",
        ("GET", "/v1/methods"): "list_methods", ("GET", "/healthz"): "healthz",
        ("GET", "/readyz"): "readyz", ("GET", "/metrics"): "metrics",
        ("POST", "/v1/jobs:validate"): "validate_job",
        ("GET", "/v1/schedules"): "list_schedules", ("POST", "/v1/schedules"): "create_schedule",
        ("GET", "/v1/schedules/{schedule_id}"): "get_schedule",
        ("DELETE", "/v1/schedules/{schedule_id}"): "delete_schedule",
        ("POST", "/v1/schedules/{schedule_id}/pause"): "pause_schedule",
        ("POST", "/v1/schedules/{schedule_id}/resume"): "resume_schedule",
        ("POST", "/v1/schedules/{schedule_id}/run"): "run_schedule",
        ("GET", "/v1/schedules/{schedule_id}/runs"): "list_schedule_runs"}
    events = doc["paths"]["/v1/events"]["get"]
    assert events["summary"].startswith("Server-Sent Events of every job")
    for path in ("/v1/events", "/v1/jobs/{job_id}/events"):  # each event's `data`, by name
        stream = doc["paths"][path]["get"]["responses"]["200"]["content"]["text/event-stream"]
        assert {name: ref["$ref"].rsplit("/", 1)[1] for name, ref in
                stream["x-events"].items()} == {"state": "JobStateEvent",
                                                "progress": "JobProgressEvent"}
    assert {"job_id", "status", "reason"} <= set(
        doc["components"]["schemas"]["JobStateEvent"]["properties"])
    assert {"job_id", "stage", "done", "total", "current"} == set(
        doc["components"]["schemas"]["JobProgressEvent"]["properties"])
    validate = doc["paths"]["/v1/jobs:validate"]["post"]
    assert set(validate["requestBody"]["content"]) == {"application/yaml", "application/json"}
    schemas = doc["components"]["schemas"]
    record = schemas["JobRecord"]["properties"]
    assert set(record) == {"id", "name", "status", "spec", "progress", "created_at",
                           "started_at", "finished_at", "worker", "result", "error",
                           "schedule_id"}
    assert schemas["JobSpec"]["additionalProperties"] is False
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    create = doc["paths"]["/v1/jobs"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"] \
        == "#/components/schemas/JobSpec"
    assert create["responses"]["422"]["content"]["application/json"]["schema"]["$ref"] \
        == "#/components/schemas/ErrorResponse"
    assert "HTTPValidationError" not in schemas
    assert client.get("/docs").status_code == 200


# --- the OpenAPI document says what the API answers (for clients generated from it) ---------

def documented(doc: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any]:
    return doc["paths"][path][method.lower()]["responses"][str(status)]


def test_redis_down_is_a_documented_503(tmp_path: Path) -> None:
    """While Redis is down every endpoint that reads the job store answers 503 in the error
    shape; the document lists it, or a generated client can parse no answer of those."""
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = create_app(service_settings(url, tmp_path / "data"))
    job_id = schedule_id = "0123456789abcdef0123"
    with TestClient(app, base_url="http://127.0.0.1") as client:
        doc = client.get("/openapi.json").json()
        for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"),
                             ("GET", "/v1/jobs/{job_id}/report"),
                             ("POST", "/v1/jobs/{job_id}/cancel"), ("GET", "/v1/schedules"),
                             ("POST", "/v1/schedules/{schedule_id}/pause"),
                             ("DELETE", "/v1/schedules/{schedule_id}")]:
            response = client.request(method, path.format(job_id=job_id,
                                                           schedule_id=schedule_id))
            assert response.status_code == 503, path
            assert error(response)["type"] == "Unavailable"
            schema = documented(doc, method, path, 503)["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, path


def test_metrics_are_documented_as_text(client: TestClient) -> None:
    """With a schema for the body, a generated client returns the text (else it drops it)."""
    doc = client.get("/openapi.json").json()
    response = client.get("/metrics")
    assert documented(doc, "GET", "/metrics", 200)["content"] == {
        response.headers["content-type"]: {"schema": {"type": "string"}}}


def security(doc: dict[str, Any], method: str, path: str) -> list[dict[str, list[str]]]:
    return doc["paths"][path][method]["security"]


def test_the_document_says_when_a_key_is_needed(client: TestClient, keyed: TestClient) -> None:
    """`{}` among an operation's security requirements: it answers without a key too."""
    with_keys = keyed.get("/openapi.json").json()
    assert security(with_keys, "get", "/v1/jobs") == [{"HTTPBearer": []}]
    assert keyed.get("/v1/jobs").status_code == 401
    assert security(with_keys, "get", "/readyz") == [{"HTTPBearer": []}, {}]
    ready = keyed.get("/readyz")  # no worker: not ready, told without a key all the same
    assert ready.status_code == 503 and ready.json()["workers"] == []

    local = client.get("/openapi.json").json()  # local mode: no key anywhere
    operations = [(method, path) for path, item in local["paths"].items() for method in item]
    assert all({} in security(local, method, path) for method, path in operations
               if path != "/healthz")
    assert client.get("/v1/jobs").status_code == 200


def test_the_formats_of_cursor_and_last_event_id_are_documented(
        client: TestClient, minilm_inputs: Inputs, tmp_path: Path) -> None:
    """What the server hands out matches the documented pattern; what it refuses does not."""
    doc = client.get("/openapi.json").json()

    def pattern(path: str, name: str) -> re.Pattern[str]:
        parameter, = (p for p in doc["paths"][path]["get"]["parameters"] if p["name"] == name)
        return re.compile(parameter["schema"]["pattern"])

    for i in range(2):
        client.post("/v1/jobs", json=spec_body(minilm_inputs, tmp_path / f"out{i}"))
    page = client.get("/v1/jobs", params={"limit": 1}).json()
    cursor = pattern("/v1/jobs", "cursor")
    assert cursor.match(page["next_cursor"])
    assert not cursor.match("garbage")  # a 400 (test_invalid_cursor_is_a_400)

    job_id = page["jobs"][0]["id"]
    client.post(f"/v1/jobs/{job_id}/cancel")  # ended: its stream ends after the replay
    stream = client.get(f"/v1/jobs/{job_id}/events").text
    ids = [line.removeprefix("id: ") for line in stream.splitlines() if line.startswith("id: ")]
    event_id = pattern("/v1/jobs/{job_id}/events", "last-event-id")
    assert ids and all(event_id.match(i) for i in ids)
    assert event_id.match("")
    assert client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": ""}).text == stream
    assert not event_id.match("abc")  # a 400 (test_invalid_last_event_id_is_a_400)


# --- auth ---------------------------------------------------------------------------------------

ROLE_CASES = [  # (method, path, lowest role allowed)
    ("GET", "/v1/jobs", "read"), ("GET", "/v1/jobs/{id}", "read"),
    ("GET", "/v1/jobs/{id}/report", "read"), ("GET", "/v1/methods", "read"),
    ("GET", "/metrics", "read"), ("POST", "/v1/jobs", "submit"),
    ("POST", "/v1/jobs/{id}/retry", "submit"), ("POST", "/v1/jobs/{id}/cancel", "submit"),
]
RANK = {"read": 0, "submit": 1, "admin": 2}


def test_roles_allowed_and_refused(keyed: TestClient, store: JobStore, minilm_inputs: Inputs,
                                   tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts = []

    def call(method: str, path: str, key: str | None, n: int) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = spec_body(minilm_inputs, tmp_path / f"o{n}") if method == "POST" else None
        response = keyed.request(method, path, headers=headers, json=body)
        texts.append(response.text + json.dumps(dict(response.headers)))
        return response.status_code

    seed = keyed.post("/v1/jobs", json=spec_body(minilm_inputs, tmp_path / "seed"),
                      headers={"Authorization": f"Bearer {KEYS['submit']}"}).json()["id"]
    n = 0
    for method, template, lowest in ROLE_CASES:
        for role in ("read", "submit", "admin"):
            n += 1
            path = template.format(id=seed)
            status = call(method, path, KEYS[role], n)
            if RANK[role] < RANK[lowest]:
                assert status == 403, (method, path, role)
            else:
                assert status not in (401, 403), (method, path, role, status)
        assert call(method, template.format(id=seed), None, 0) == 401
        assert call(method, template.format(id=seed), "not-a-key-" * 3, 0) == 401
    # open to probes: liveness, readiness
    assert keyed.get("/healthz").status_code == 200
    store.worker_heartbeat("probe@test", {"name": "probe@test", "hostname": "probe-host",
                                          "pid": 4242, "queues": ["cpu"], "started_at": "now"},
                           ttl_s=30)
    anonymous = keyed.get("/readyz")
    assert anonymous.status_code == 200 and anonymous.json()["live_workers"] >= 1
    assert anonymous.json()["workers"] == [] and "probe-host" not in anonymous.text
    known = keyed.get("/readyz", headers={"Authorization": f"Bearer {KEYS['read']}"}).json()
    assert "probe-host" in [w["hostname"] for w in known["workers"]]
    missing = keyed.get("/v1/jobs")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert error(missing)["type"] == "Unauthorized"

    everything = "\n".join(texts) + caplog.text
    for key in KEYS.values():
        assert key not in everything


def test_cancel_is_for_the_submitter_or_an_admin(keyed: TestClient, minilm_inputs: Inputs,
                                                 tmp_path: Path) -> None:
    def as_(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[role]}"}

    job = keyed.post("/v1/jobs", json=spec_body(minilm_inputs, tmp_path / "a"),
                     headers=as_("submit")).json()
    refused = keyed.post(f"/v1/jobs/{job['id']}/cancel", headers=as_("submit2"))
    assert refused.status_code == 403
    assert keyed.post(f"/v1/jobs/{job['id']}/cancel", headers=as_("submit")).status_code == 202
    other = keyed.post("/v1/jobs", json=spec_body(minilm_inputs, tmp_path / "b"),
                       headers=as_("submit2")).json()
    assert keyed.post(f"/v1/jobs/{other['id']}/cancel", headers=as_("admin")).status_code \
        == 202
    # idempotency keys are per API key: the same key from another caller is a new job
    body = spec_body(minilm_inputs, tmp_path / "c")
    one = keyed.post("/v1/jobs", json=body, headers={**as_("submit"), "Idempotency-Key": "k"})
    two = keyed.post("/v1/jobs", json=body, headers={**as_("submit2"), "Idempotency-Key": "k"})
    assert one.json()["id"] != two.json()["id"]


def test_bad_key_configuration_is_refused(redis_server: EmbeddedRedis, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    secret = "short-secret"
    monkeypatch.setenv("MERGE_SERVICE_API_KEYS", f"{secret}:admin")
    assert cli(["api", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "at least 16 characters" in err and secret not in err
    monkeypatch.setenv("MERGE_SERVICE_API_KEYS", "a-long-enough-secret-key:root")
    assert cli(["api", "--port", "1"]) == 1
    assert "a-long-enough-secret-key" not in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_local_mode_binds_loopback_only(host: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MERGE_SERVICE_API_KEYS", raising=False)
    for command in ("api", "up"):
        assert cli([command, "--host", host, "--port", "1"]) == 1
        assert "local mode" in capsys.readouterr().err
