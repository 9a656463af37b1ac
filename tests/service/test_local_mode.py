"""Local mode (no API key configured) inside the app: loopback clients and host names only, and
no writes from pages of other origins (DNS rebinding, cross-site requests)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import is_loopback
from tests.service.conftest import API_KEYS, KEYS, redis_url, service_settings
from workers.redis_server import EmbeddedRedis

DB = 13
SPEC = {"base": "/nowhere/base", "models": [{"source": "/nowhere/a"}, {"source": "/nowhere/b"}],
        "method": {"name": "task_arithmetic"}, "output": {"destination": "/nowhere/out"}}


@pytest.fixture
def connect(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator:
    """`connect(client)`: a test client of an app in local mode, as seen from `client`."""
    with ExitStack() as stack:
        def connect(client: tuple[str, int] = ("127.0.0.1", 5000)) -> TestClient:
            app = create_app(service_settings(redis_url(redis_server, DB), tmp_path / "data"))
            return stack.enter_context(TestClient(app, base_url="http://127.0.0.1:8000",
                                                  client=client))
        yield connect


def refusal(response) -> str:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["type"] == "LocalModeOnly" and "local mode" in error["message"]
    return error["message"]


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000",
                                  "127.0.0.2", "localhost"])
def test_loopback_host_names_are_served(connect, host: str) -> None:
    http = connect()
    assert http.get("/v1/jobs", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["rebound.example.com", "rebound.example.com:8000",
                                  "192.168.1.20:8000", "127.0.0.1.nip.io"])
def test_other_host_names_are_refused(connect, host: str) -> None:
    """A page whose DNS name was rebound to 127.0.0.1 sends its own name as Host."""
    http = connect()
    for path in ("/v1/jobs", "/", "/v1/methods"):
        assert repr(host.split(":")[0]) in refusal(http.get(path, headers={"Host": host}))
    assert "host" in refusal(http.post("/v1/jobs", json=SPEC, headers={"Host": host}))


def test_non_loopback_clients_are_refused(connect) -> None:
    """A server started around `merge-service api`'s bind check (uvicorn on 0.0.0.0)."""
    for client in (("203.0.113.7", 4000), ("::ffff:10.0.0.3", 4000)):
        assert client[0] in refusal(connect(client).get("/v1/jobs"))


def test_requests_a_local_proxy_forwards_from_elsewhere_are_refused(connect) -> None:
    """A reverse proxy on this machine (nginx sends Host 127.0.0.1 from a loopback client)
    tells who it forwards for."""
    http = connect()
    for header, value in (("X-Forwarded-For", "203.0.113.9"),
                          ("X-Forwarded-For", "127.0.0.1, 198.51.100.4"),
                          ("X-Real-IP", "198.51.100.4"),
                          ("Forwarded", "for=198.51.100.4;proto=https")):
        refusal(http.get("/v1/jobs", headers={header: value}))
    assert http.get("/v1/jobs", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200


def test_writes_from_other_origins_are_refused(connect) -> None:
    """A cross-site form or fetch reaches 127.0.0.1 with the right Host: its Origin tells."""
    http = connect()
    for origin in ("https://evil.example", "null"):
        message = refusal(http.post("/v1/jobs:validate", content="base: x",
                                    headers={"Origin": origin, "Content-Type": "text/plain"}))
        assert "origin" in message
        refusal(http.post("/v1/jobs", json=SPEC, headers={"Origin": origin}))
    # reads carry no side effect; the dashboard's own pages send a loopback Origin
    assert http.get("/v1/jobs", headers={"Origin": "https://evil.example"}).status_code == 200
    answer = http.post("/v1/jobs", json=SPEC, headers={"Origin": "http://127.0.0.1:8000"})
    assert answer.status_code == 422  # through the guard, to preflight (the paths do not exist)
    assert answer.json()["error"]["type"] != "LocalModeOnly"


def test_with_keys_the_guard_is_not_needed(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    app = create_app(service_settings(redis_url(redis_server, DB), tmp_path / "data",
                                      api_keys=API_KEYS))
    with TestClient(app, base_url="http://merge.internal:8000",
                    client=("203.0.113.7", 4000)) as http:
        answer = http.get("/v1/jobs", headers={"Authorization": f"Bearer {KEYS['read']}"})
    assert answer.status_code == 200


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("app.localhost", True), ("127.8.9.10", True), ("::1", True),
    ("[::1]", True), ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", False),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False),
    ("localhost.example.com", False), ("", False), (None, False)])
def test_is_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback
