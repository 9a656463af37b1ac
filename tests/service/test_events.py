"""Server-Sent Events over real HTTP: a job's stream through a long quiet spell, the list
stream of every job (`GET /v1/events`) with `Last-Event-ID` resume, and Redis failures (a 503
in the error shape; a stream that ends cleanly when Redis goes away mid-stream).

Jobs that must stay quiet are submitted for `cuda`: they wait in the `gpu` queue, which the
test worker (cpu only) never serves, until the test cancels them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.models import EVENT_MODELS
from api.sse import KEEPALIVE_MS
from tests.service.conftest import (
    Inputs,
    Service,
    service_settings,
    spec_body,
    wait_for,
)
from workers.redis_server import EmbeddedRedis, free_port

pytestmark = pytest.mark.slow
READ_TIMEOUT_S = KEEPALIVE_MS / 1000 + 45  # generous: one keepalive must come well within


def sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The blocks of a text/event-stream: events as {id, event, data}, comments as
    {comment}. Each state and progress event's `data` must match the schema the OpenAPI
    document gives it (`x-events`: no field missing or undocumented)."""
    block: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if block:
                if block.get("event") in EVENT_MODELS:
                    EVENT_MODELS[block["event"]].model_validate(block["data"])
                yield block
            block = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            field, _, value = line.partition(": ")
            block[field] = json.loads(value) if field == "data" else value


def quiet_job(http: httpx.Client, inputs: Inputs, destination: Path, name: str
              ) -> dict[str, Any]:
    body = spec_body(inputs, destination, name=name, options={"device": "cuda"})
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_job_stream_outlives_a_quiet_queue(service: Service, minilm_inputs: Inputs,
                                           tmp_path: Path) -> None:
    """The stream of a job waiting in its queue stays open through 15 s without events (a
    keepalive comes; the API's Redis client used to time out after 5 s) and still delivers
    the events that come later."""
    log_start = len(service.api.output())
    with service.client("submit") as http:
        job = quiet_job(http, minilm_inputs, tmp_path / "quiet", "quiet-stream")
        assert service.store.internal(job["id"])["queue"] == "gpu"
        timeout = httpx.Timeout(10, read=READ_TIMEOUT_S)
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=timeout) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            blocks = sse(response.iter_lines())
            first = next(blocks)
            assert first["event"] == "state" and first["data"]["status"] == "queued"
            quiet_since = time.monotonic()
            assert next(blocks) == {"comment": "keepalive"}
            assert time.monotonic() - quiet_since > 6  # quieter than the old 5 s timeout
            assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
            rest = list(blocks)  # the stream ends after the terminal event
    events = [b for b in rest if "event" in b]
    assert [e["data"]["status"] for e in events] == ["cancelled"]
    assert "Traceback" not in service.api.output()[log_start:]


def test_all_jobs_on_one_stream_and_resume(service: Service, minilm_inputs: Inputs,
                                           tmp_path: Path) -> None:
    timeout = httpx.Timeout(10, read=READ_TIMEOUT_S)
    with httpx.Client(base_url=service.url, timeout=timeout) as anonymous:
        refused = anonymous.get("/v1/events")
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "Unauthorized"
    with service.client("submit") as http, service.client("read") as reader:
        before = quiet_job(http, minilm_inputs, tmp_path / "before", "before-stream")
        with reader.stream("GET", "/v1/events", timeout=timeout) as response:
            assert response.status_code == 200
            blocks = sse(response.iter_lines())
            assert next(blocks) == {"comment": "connected"}
            # the stream is open (its start is fixed): what happens from now on is on it
            one = quiet_job(http, minilm_inputs, tmp_path / "one", "stream-one")
            two = quiet_job(http, minilm_inputs, tmp_path / "two", "stream-two")
            for job in (one, two):
                assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
            ours = {one["id"], two["id"]}
            seen: list[dict[str, Any]] = []
            for block in blocks:
                if "event" not in block:
                    continue
                assert block["data"]["job_id"] != before["id"]  # from before the stream
                if block["data"]["job_id"] in ours:
                    seen.append(block)
                if [b["data"].get("status") for b in seen].count("cancelled") == 2:
                    break
            # the list stream stays open: a keepalive when nothing happens
            assert next(b for b in blocks if "event" not in b) == {"comment": "keepalive"}
    order = [(b["data"]["job_id"], b["event"], b["data"]["status"]) for b in seen]
    assert order == [(one["id"], "state", "queued"), (two["id"], "state", "queued"),
                     (one["id"], "state", "cancelled"), (two["id"], "state", "cancelled")]
    assert seen[0]["data"]["id"] == one["id"]  # the job stream's data, with its job_id
    assert [b["id"] for b in seen] == sorted(b["id"] for b in seen)

    # a client that lost the connection after the first event resumes after it
    with service.client("read") as reader, reader.stream(
            "GET", "/v1/events", headers={"Last-Event-ID": seen[0]["id"]},
            timeout=timeout) as response:
        resumed = []
        for block in sse(response.iter_lines()):
            assert block.get("event") != "reset"  # nothing it missed was dropped
            if "event" in block and block["data"]["job_id"] in ours:
                resumed.append(block)
            if len(resumed) == 3:
                break
    assert [b["id"] for b in resumed] == [b["id"] for b in seen[1:]]
    with service.client("read") as reader:
        bad = reader.get("/v1/events", headers={"Last-Event-ID": "not-an-id"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequest"


def test_resuming_after_dropped_events_is_told_to_reset(service: Service,
                                                        minilm_inputs: Inputs,
                                                        tmp_path: Path) -> None:
    """A client further behind than the list stream keeps (its oldest event is later than the
    client's Last-Event-ID) is sent `event: reset` first: read the list again."""
    with service.client("submit") as http:  # at least one event in the stream
        job = quiet_job(http, minilm_inputs, tmp_path / "out", "reset-me")
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    timeout = httpx.Timeout(10, read=READ_TIMEOUT_S)
    with service.client("read") as reader, reader.stream(
            "GET", "/v1/events", headers={"Last-Event-ID": "1-0"}, timeout=timeout) as response:
        blocks = sse(response.iter_lines())
        assert next(blocks) == {"comment": "connected"}
        reset = next(blocks)
    assert reset["event"] == "reset" and "GET /v1/jobs" in reset["data"]["reason"]


def test_redis_down_is_a_503_in_the_error_shape(tmp_path: Path) -> None:
    nothing = f"redis://127.0.0.1:{free_port()}/0"  # no server listens there
    app = create_app(service_settings(nothing, tmp_path / "data"))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=True) as client:
        for path in ("/v1/jobs", f"/v1/jobs/{'0' * 20}", f"/v1/jobs/{'0' * 20}/events",
                     "/v1/events"):
            response = client.get(path)
            assert response.status_code == 503, (path, response.text)
            error = response.json()["error"]
            assert error["type"] == "Unavailable", path
            assert "Redis" in error["message"] and "ConnectionError" in error["message"]
            assert response.headers["retry-after"] == "5"


def test_stream_ends_cleanly_when_redis_goes_away(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    try:
        app = create_app(service_settings(server.url, tmp_path / "data"))
        with TestClient(app, base_url="http://127.0.0.1",
                        raise_server_exceptions=True) as client, \
                ThreadPoolExecutor(1) as pool:
            # the test client answers once the stream has ended (or raises what the app did)
            streaming = pool.submit(client.get, "/v1/events")
            probe = redis.Redis.from_url(server.url, decode_responses=True)
            wait_for(lambda: any(c["cmd"] == "xread" for c in probe.client_list()),
                     timeout=60, what="the stream to block on Redis")
            probe.close()
            server.stop()
            response = streaming.result(timeout=120)
    finally:
        server.stop()
    assert response.status_code == 200
    assert response.text.startswith(": connected\n\n")
    assert response.text.endswith(": the job store is unavailable; reconnect with "
                                  "Last-Event-ID\n\n")
