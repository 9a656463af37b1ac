"""`Idempotency-Key` over real HTTP, against an API process on real Redis (no worker: the jobs
stay queued): a replay is answered before preflight, concurrent duplicates make one job, and a
submit that produced no queued job leaves the key free."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from merge_service.spec import JobSpec
from tests.service.conftest import (
    Inputs,
    Process,
    redis_url,
    service_env,
    spec_body,
    start_api,
)
from workers.jobs import JobStore
from workers.redis_server import EmbeddedRedis

DB = 9


@pytest.fixture(scope="module")
def api(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[str, JobStore]]:
    url = redis_url(redis_server, DB)
    store = JobStore.from_url(url)
    store.r.flushdb()
    root = tmp_path_factory.mktemp("idempotency")
    process: Process
    process, api_url = start_api(service_env(url, root / "data"), root)
    yield api_url, store
    process.stop()
    store.r.close()


def post(url: str, body: dict[str, Any], key: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", json=body, headers={"Idempotency-Key": key}, timeout=60)


def messages(store: JobStore, job_id: str) -> int:
    """Messages for `job_id` waiting in the `cpu` queue (Celery's task id is the job id)."""
    return sum(f'"id": "{job_id}"' in m for m in store.r.lrange("cpu", 0, -1))


def test_a_replay_after_the_job_wrote_its_destination_is_the_same_job(
        api: tuple[str, JobStore], minilm_inputs: Inputs, tmp_path: Path) -> None:
    url, store = api
    destination = tmp_path / "out"
    body = spec_body(minilm_inputs, destination)
    first = post(url, body, "written-1")
    assert first.status_code == 202, first.text
    destination.mkdir()  # as the job's worker would have, before the client's retry
    (destination / "model.safetensors").write_bytes(b"x")
    again = post(url, body, "written-1")
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert messages(store, first.json()["id"]) == 1


def test_another_body_with_the_key_is_a_conflict_before_any_preflight(
        api: tuple[str, JobStore], minilm_inputs: Inputs, tmp_path: Path) -> None:
    url, _ = api
    assert post(url, spec_body(minilm_inputs, tmp_path / "a"), "other-1").status_code == 202
    invalid = spec_body(minilm_inputs, tmp_path / "b", method="nope")
    conflict = post(url, invalid, "other-1")
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["error"]["type"] == "IdempotencyConflict"
    assert post(url, invalid, "other-2").status_code == 422  # the same body, a new key


def test_concurrent_duplicates_make_one_job(api: tuple[str, JobStore], minilm_inputs: Inputs,
                                            tmp_path: Path) -> None:
    url, store = api
    body = spec_body(minilm_inputs, tmp_path / "out", name="concurrent")
    n = 8
    barrier = threading.Barrier(n)
    responses: list[httpx.Response] = []

    def submit() -> None:
        barrier.wait()
        responses.append(post(url, body, "concurrent-1"))

    threads = [threading.Thread(target=submit) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(responses) == n
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    jobs, _ = store.list(name="concurrent")
    assert [j.id for j in jobs] == list(ids)
    assert messages(store, ids.pop()) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == n - 1


def test_a_duplicate_waits_for_the_request_that_claimed_the_key(
        api: tuple[str, JobStore], minilm_inputs: Inputs, tmp_path: Path) -> None:
    """The key is claimed before the job exists (its request still in preflight): the
    duplicate must neither take the key over nor make a second job, but get the first's."""
    url, store = api
    body = spec_body(minilm_inputs, tmp_path / "out", name="claimed")
    spec = JobSpec.model_validate(body)
    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
    claim = store.claim_idempotency("local:claimed-1", digest)  # the first request, in flight
    answer: list[httpx.Response] = []
    duplicate = threading.Thread(target=lambda: answer.append(post(url, body, "claimed-1")))
    duplicate.start()
    time.sleep(1.0)
    assert not answer  # still waiting for the first request's job
    record = store.create(spec, queue="cpu", idempotency=claim)  # the first request's job
    duplicate.join()
    assert answer[0].status_code == 202, answer[0].text
    assert answer[0].json()["id"] == record.id
    assert answer[0].headers.get("idempotent-replayed") == "true"
    jobs, _ = store.list(name="claimed")
    assert [j.id for j in jobs] == [record.id]


def test_a_failed_enqueue_frees_the_key(api: tuple[str, JobStore], minilm_inputs: Inputs,
                                        tmp_path: Path) -> None:
    url, store = api
    body = spec_body(minilm_inputs, tmp_path / "out", name="enqueue")
    store.r.delete("cpu")
    store.r.set("cpu", "not a queue")  # the broker refuses the message (WRONGTYPE)
    try:
        refused = post(url, body, "enqueue-1")
    finally:
        store.r.delete("cpu")
    assert refused.status_code == 503, refused.text
    failed, _ = store.list(name="enqueue")
    assert [j.status for j in failed] == ["failed"]
    again = post(url, body, "enqueue-1")
    assert again.status_code == 202, again.text
    assert again.json()["id"] != failed[0].id and again.json()["status"] == "queued"
    assert again.headers.get("idempotent-replayed") is None
    assert messages(store, again.json()["id"]) == 1


def test_a_refused_spec_frees_the_key(api: tuple[str, JobStore], minilm_inputs: Inputs,
                                      tmp_path: Path) -> None:
    url, _ = api
    destination = tmp_path / "exists"
    destination.mkdir()
    body = spec_body(minilm_inputs, destination)
    refused = post(url, body, "refused-1")
    assert refused.status_code == 422, refused.text
    shutil.rmtree(destination)  # the caller fixes the problem and sends the same request
    again = post(url, body, "refused-1")
    assert again.status_code == 202, again.text
    assert again.headers.get("idempotent-replayed") is None
