"""Jobs through the whole service: an API process, real Celery worker processes, real Redis.

End to end over HTTP with SSE progress and a `transformers` load of the output; cancel in the
middle of a merge; a worker killed with SIGKILL in the middle of a merge, its job finished by
new workers with a byte-identical output, never run by two workers at once.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from api.client import ServiceClient, parse_sse
from api.models import EVENT_MODELS
from merge_service.engine import run_merge
from merge_service.errors import PreflightError
from merge_service.sinks.local import LocalDirectorySink
from merge_service.spec import JobSpec, spec_from_dict
from tests.conftest import assert_nothing_written, leftovers, read_tensors
from tests.service.conftest import (
    HEARTBEAT_S,
    KEYS,
    Inputs,
    Service,
    redis_url,
    service_env,
    service_settings,
    slow_spec,
    spec_body,
    start_worker,
    wait_for,
)
from workers.celery_app import RUN_JOB, make_celery
from workers.jobs import ACTIVE, TERMINAL, JobProgress, JobStore
from workers.redis_server import EmbeddedRedis

pytestmark = pytest.mark.slow


def submit(service: Service, body: dict[str, Any], role: str = "submit") -> dict[str, Any]:
    with service.client(role) as http:
        response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_end_to_end_over_http_with_sse(service: Service, minilm_inputs: Inputs,
                                       tmp_path: Path, hf_offline: None) -> None:
    destination = tmp_path / "merged"
    job = submit(service, spec_body(minilm_inputs, destination, name="e2e"))

    # raw SSE, as a browser's EventSource reads it
    with service.client("read") as http, http.stream(
            "GET", f"/v1/jobs/{job['id']}/events", timeout=120) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = list(parse_sse(stream.iter_lines()))
    states = [e["data"]["status"] for e in events if e["type"] == "state"]
    assert states == ["queued", "validating", "running", "succeeded"]
    merging = [e["data"] for e in events if e["type"] == "progress"
               and e["data"]["stage"] == "merging"]
    assert len(merging) > 50  # per tensor
    assert [p["done"] for p in merging] == sorted(p["done"] for p in merging)
    assert merging[-1]["done"] == merging[-1]["total"]
    assert all(e["id"] for e in events)
    for event in events:  # as the OpenAPI document describes each event's `data`
        EVENT_MODELS[event["type"]].model_validate(event["data"])

    # resuming after the third event replays exactly the rest
    with service.client("read") as http:
        rest = http.get(f"/v1/jobs/{job['id']}/events",
                        headers={"Last-Event-ID": events[2]["id"]})
    assert [e["id"] for e in parse_sse(iter(rest.text.splitlines()))] \
        == [e["id"] for e in events[3:]]

    with service.client("read") as http:
        record = http.get(f"/v1/jobs/{job['id']}").json()
        report = http.get(f"/v1/jobs/{job['id']}/report").json()
        listed = http.get("/v1/jobs", params={"name": "e2e", "status": "succeeded"}).json()
    assert record["status"] == "succeeded"
    assert record["worker"] == service.workers[0].args[2]
    assert record["result"]["destination"] == str(destination)
    assert record["result"]["url"] is None and record["result"]["revision"] is None
    assert "model.safetensors.index.json" in record["result"]["files"]  # 40 MB shards
    assert record["progress"]["stage"] == "finalizing"
    assert record["started_at"] <= record["finished_at"]
    assert record["error"] is None
    assert report == json.loads((destination / "merge_report.json").read_text())
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    # a job never replaces a local output: its retry is refused, saying why
    with service.client("submit") as http:
        retried = http.post(f"/v1/jobs/{job['id']}/retry")
    assert retried.status_code == 409
    assert retried.json()["error"]["message"] == (
        f"job {job['id']} succeeded and its output is at {destination}: a retry would write "
        "there again; submit its spec with another destination")

    # the output is the library's output, and loads with transformers
    from transformers import AutoModel

    reference = run_merge(spec_from_dict(spec_body(minilm_inputs, tmp_path / "reference")))
    ours, theirs = read_tensors(destination), read_tensors(reference.destination)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    model = AutoModel.from_pretrained(destination)
    assert model.config.hidden_size == 384

    # no key in any log
    logs = service.api.output() + service.worker_logs()
    assert "POST /v1/jobs HTTP/1.1\" 202" in logs
    for key in KEYS.values():
        assert key not in logs


def test_submit_wait_from_the_command_line(service: Service, minilm_inputs: Inputs,
                                           tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from merge_service.cli import main as cli

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(spec_body(minilm_inputs, "out/merged", name="cli")))
    monkeypatch.chdir(tmp_path)  # a relative destination is the caller's
    monkeypatch.setenv("MERGE_SERVICE_API_URL", service.url)
    monkeypatch.setenv("MERGE_SERVICE_API_KEY", KEYS["submit"])
    assert cli(["submit", str(spec), "--wait", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("succeeded: job ")
    assert f"-> {tmp_path / 'out' / 'merged'}" in out
    assert (tmp_path / "out" / "merged" / "model.safetensors.index.json").is_file()

    # a spec the service refuses: exit 1, every problem listed
    spec.write_text(json.dumps(spec_body(minilm_inputs, "out/merged", method="nope")))
    assert cli(["submit", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "already exists" in err
    # a read key cannot submit
    monkeypatch.setenv("MERGE_SERVICE_API_KEY", KEYS["read"])
    spec.write_text(json.dumps(spec_body(minilm_inputs, "out/other")))
    assert cli(["submit", str(spec)]) == 1
    assert "Forbidden" in capsys.readouterr().err


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_on_submit_wait_leaves_the_job_running(service: Service, minilm_inputs: Inputs,
                                                     tmp_path: Path) -> None:
    """The job is the service's: Ctrl-C stops following it, says so, and does not claim that
    nothing was written. The worker is held (SIGSTOP) from the moment the merge is under way,
    so that the job is still running when the follower is interrupted, however loaded the
    machine."""
    name = f"ctrl-c-{secrets.token_hex(3)}"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(slow_spec(minilm_inputs, tmp_path / "merged") | {"name": name}))
    env = service.env | {"MERGE_SERVICE_API_URL": service.url,
                         "MERGE_SERVICE_API_KEY": KEYS["submit"]}
    # Ctrl-C as in a terminal: a shell without job control (CI's, or `make test &`) starts
    # its background commands with SIGINT ignored, which the follower would inherit (Python
    # then never raises KeyboardInterrupt)
    follower = subprocess.Popen([sys.executable, "-m", "merge_service.cli", "submit",
                                 str(spec), "--wait"], env=env, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_default_sigint)
    worker = service.workers[0]
    try:
        job = wait_for(lambda: next(iter(service.store.list(name=name)[0]), None), timeout=60,
                       what="the job")

        def under_way() -> bool:
            record = service.store.get(job.id)
            return record is not None and record.progress is not None \
                and record.progress.stage == "merging" and record.progress.done >= 2

        wait_for(under_way, timeout=120, interval=0.01, what="the merge to be under way")
        worker.kill(signal.SIGSTOP)
        try:
            assert service.store.get(job.id).status == "running"  # type: ignore[union-attr]
            assert follower.poll() is None
            follower.send_signal(signal.SIGINT)
            _, err = follower.communicate(timeout=30)
            assert service.store.get(job.id).status == "running"  # type: ignore[union-attr]
        finally:
            worker.kill(signal.SIGCONT)
    finally:
        follower.kill()
    assert follower.returncode == 2, err
    assert f"stopped following job {job.id}; it goes on in the service" in err
    assert "nothing was written" not in err and "Traceback" not in err
    assert err.count(": queued") == 1, err
    with service.client("submit") as http:
        assert http.post(f"/v1/jobs/{job.id}/cancel").status_code == 202
    assert service.wait_terminal(job.id).status == "cancelled"


def test_cancel_in_the_middle(service: Service, minilm_inputs: Inputs, tmp_path: Path) -> None:
    destination = tmp_path / "cancelled"
    job = submit(service, slow_spec(minilm_inputs, destination))
    wait_for(lambda: service.store.get(job["id"]).progress.done >= 5, timeout=120,
             interval=0.02, what="the merge to be under way")
    with service.client("submit") as http:
        response = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    record = service.wait_terminal(job["id"])
    assert record.status == "cancelled"
    assert 5 <= record.progress.done < record.progress.total
    assert record.result is None and record.error is None
    assert_nothing_written(destination)
    with service.client("read") as http:
        assert http.get(f"/v1/jobs/{job['id']}/report").status_code == 409

    # the worker is free for the next job
    follow_up = submit(service, spec_body(minilm_inputs, tmp_path / "next"))
    assert service.wait_terminal(follow_up["id"]).status == "succeeded"


def test_a_failed_job_records_its_error_and_can_be_retried(service: Service,
                                                           minilm_inputs: Inputs,
                                                           tmp_path: Path) -> None:
    # passes the API's preflight, then its input disappears before the worker runs it
    task = tmp_path / "vanishing"
    task.mkdir()
    for f in minilm_inputs.models[0].iterdir():
        (task / f.name).symlink_to(f)
    body = spec_body(minilm_inputs, tmp_path / "out")
    body["models"][0]["source"] = str(task)
    with service.client("submit") as http:
        service.workers[0].kill(signal.SIGSTOP)  # hold the worker while the input goes
        try:
            job = http.post("/v1/jobs", json=body).json()
            (task / "model.safetensors").unlink()
        finally:
            service.workers[0].kill(signal.SIGCONT)
        record = service.wait_terminal(job["id"])
        assert record.status == "failed"
        assert record.error is not None and record.error.type == "PreflightError"
        assert "vanishing" in record.error.message
        problems = record.error.details["problems"]
        assert problems and problems[0]["model"] == "vanishing"
        assert "Traceback" not in json.dumps(record.model_dump(mode="json"))

        (task / "model.safetensors").symlink_to(minilm_inputs.models[0] / "model.safetensors")
        retried = http.post(f"/v1/jobs/{job['id']}/retry")
        assert retried.status_code == 202
        assert service.wait_terminal(retried.json()["id"]).status == "succeeded"


def test_a_killed_worker_s_job_is_finished_by_another(
        redis_server: EmbeddedRedis, minilm_inputs: Inputs, tmp_path: Path) -> None:
    url = redis_url(redis_server, 3)
    store = JobStore.from_url(url)
    store.r.flushdb()
    env = service_env(url, tmp_path / "data")
    first = start_worker(env, store, tmp_path, f"doomed-{secrets.token_hex(3)}@test")
    workers = [first]
    try:
        destination = tmp_path / "merged"
        from fastapi.testclient import TestClient

        from api.app import create_app
        from tests.service.conftest import service_settings

        with TestClient(create_app(service_settings(url, tmp_path / "data")),
                        base_url="http://127.0.0.1") as http:
            job = http.post("/v1/jobs", json=slow_spec(minilm_inputs, destination)).json()
        total = wait_for(lambda: (progress := store.get(job["id"]).progress).stage
                         == "merging" and progress.total, timeout=120, interval=0.02,
                         what="the merge to start")
        wait_for(lambda: store.get(job["id"]).progress.done >= total // 3, timeout=120,
                 interval=0.02, what="a third of the merge")
        first.kill(signal.SIGKILL)  # the worker and its pool child, mid-merge
        first.process.wait()
        assert store.get(job["id"]).status in ACTIVE
        assert leftovers(destination)  # the killed attempt's temporary directory

        # two new workers, and a duplicate delivery of the job on top of the reaper's requeue
        workers += [start_worker(env, store, tmp_path, f"heir{i}-{secrets.token_hex(3)}@test")
                    for i in (1, 2)]
        make_celery(service_settings(url, tmp_path)).send_task(RUN_JOB, args=[job["id"]],
                                                                queue="cpu")
        record = wait_for(lambda: (r := store.get(job["id"])) and r.status == "succeeded" and r,
                          timeout=180, interval=0.1, what="the job to finish")
    finally:
        for worker in workers:
            worker.stop()
    logs = "\n".join(w.output() for w in workers)

    states = [e.data for e in store.events(job["id"]) if e.type == "state"]
    statuses = [s["status"] for s in states]
    assert statuses.count("validating") == 2, (statuses, logs[-4000:])  # run twice, not thrice
    assert statuses[-1] == "succeeded" and statuses.count("succeeded") == 1
    assert record.worker != first.args[2]
    assert store.internal(job["id"])["attempts"] == 2
    # one worker ran it at a time: every start follows a requeue or is the first
    starts = [i for i, s in enumerate(statuses) if s == "validating"]
    assert statuses[starts[1] - 1] == "queued" or "redelivered" in logs
    assert "dropped" in logs or "already succeeded" in logs  # the duplicate delivery

    # byte-identical to an uninterrupted run; nothing left behind
    assert leftovers(destination) == []
    reference = run_merge(spec_from_dict(slow_spec(minilm_inputs, tmp_path / "reference")))
    files = sorted(str(p.relative_to(destination)) for p in destination.rglob("*")
                   if p.is_file())
    assert files == sorted(str(p.relative_to(reference.destination))
                           for p in reference.destination.rglob("*") if p.is_file())
    for name in files:
        ours = (destination / name).read_bytes()
        theirs = (reference.destination / name).read_bytes()
        if name == "merge_report.json":  # timings and peak memory differ from run to run
            ours_json, theirs_json = json.loads(ours), json.loads(theirs)
            for volatile in ("timings_s", "peak_memory"):
                ours_json.pop(volatile), theirs_json.pop(volatile)
            assert ours_json.pop("job_id") == job["id"]  # the library run is no job's
            assert ours_json == theirs_json
        elif name == "merge_spec.yaml":  # only the destination differs
            assert ours.replace(b"merged", b"reference") == theirs
        else:
            assert ours == theirs, name


def merging(store: JobStore, job_id: str, attempt: int) -> bool:
    """The job's attempt number `attempt` is merging tensors."""
    record = store.get(job_id)
    return record is not None and record.status == "running" and record.progress.done > 0 \
        and store.internal(job_id)["attempts"] == attempt


def test_a_dead_child_s_leftovers_go_before_the_rerun(service: Service, minilm_inputs: Inputs,
                                                      tmp_path: Path) -> None:
    """The pool child running a job dies (the OOM killer, say) while its worker lives on: the
    rerun, on that same worker, removes the dead attempt's temporary directory before it
    starts, rather than keeping a model's worth of disk until it ends."""
    destination = tmp_path / "merged"
    job = submit(service, slow_spec(minilm_inputs, destination))
    store = service.store
    wait_for(lambda: merging(store, job["id"], 1), timeout=120, interval=0.02,
             what="the merge to start")
    owner = store.lock_owner(job["id"])
    assert owner is not None
    os.kill(int(owner.rpartition(":")[2]), signal.SIGKILL)  # the child alone
    assert len(leftovers(destination)) == 1
    wait_for(lambda: merging(store, job["id"], 2), timeout=120, interval=0.02,
             what="the rerun to merge")
    assert len(leftovers(destination)) <= 1  # the rerun's own, if it has begun writing
    assert service.wait_terminal(job["id"]).status == "succeeded"
    assert leftovers(destination) == []


@pytest.mark.parametrize("whose", ["this job's", "another job's"])
def test_a_rerun_replaces_only_its_own_output_and_removes_only_its_own_leftovers(
        service: Service, minilm_inputs: Inputs, tmp_path: Path, whose: str) -> None:
    """The rerun of a job whose child died finds the destination written: it replaces the
    output only if this job wrote it (an attempt that committed, then died before recording
    success), never one another job wrote meanwhile. And of the temporaries beside the
    destination it removes the dead attempt's, not those of a merge still running there."""
    destination = tmp_path / "merged"
    job = submit(service, slow_spec(minilm_inputs, destination))
    store = service.store
    wait_for(lambda: merging(store, job["id"], 1), timeout=120, interval=0.02,
             what="the merge to start")
    with LocalDirectorySink(destination) as running:  # another merge there, still writing
        owner = store.lock_owner(job["id"])
        assert owner is not None
        os.kill(int(owner.rpartition(":")[2]), signal.SIGKILL)
        destination.mkdir()  # what the rerun will find there (before its lock can expire)
        report = {"job_id": job["id"] if whose == "this job's" else "0" * 20}
        (destination / "merge_report.json").write_text(json.dumps(report))
        record = service.wait_terminal(job["id"])
        assert running.is_dir()
        assert leftovers(destination) == [running.name]
    assert store.internal(job["id"])["attempts"] == 2
    written = json.loads((destination / "merge_report.json").read_text())
    if whose == "this job's":
        assert record.status == "succeeded", record.error
        assert written["job_id"] == job["id"] and written["method"]["name"] == "dare_ties"
    else:
        assert record.status == "failed" and record.error is not None
        assert record.error.type == "PreflightError"
        assert f"destination {destination} already exists" in record.error.message
        assert written == report  # the other job's output, untouched


# --- a worker's writes are tied to its lock; no job stays queued for good ----------------------

def test_a_stale_attempt_writes_nothing_and_commits_nothing(
        redis_server: EmbeddedRedis, minilm_inputs: Inputs, tmp_path: Path) -> None:
    """A worker stalls (SIGSTOP) mid-merge and its lock goes to someone else meanwhile, who
    also removes the stalled attempt's temporary directory (as a rerun does). Woken up, the
    stale attempt must stop without a single write: no progress, no `failed`, no output."""
    url = redis_url(redis_server, 10)
    store = JobStore.from_url(url)
    store.r.flushdb()
    env = service_env(url, tmp_path / "data")
    worker = start_worker(env, store, tmp_path, f"stalled-{secrets.token_hex(3)}@test")
    try:
        destination = tmp_path / "merged"
        spec = JobSpec.model_validate(slow_spec(minilm_inputs, destination))
        job = store.create(spec, queue="cpu")
        make_celery(service_settings(url, tmp_path)).send_task(RUN_JOB, args=[job.id],
                                                                task_id=job.id, queue="cpu")
        total = wait_for(lambda: (progress := store.get(job.id).progress).stage == "merging"
                         and progress.total, timeout=120, interval=0.02,
                         what="the merge to start")
        wait_for(lambda: store.get(job.id).progress.done >= total // 4, timeout=120,
                 interval=0.02, what="a quarter of the merge")
        worker.kill(signal.SIGSTOP)
        time.sleep(0.3)  # a write in flight when the signal came has landed
        lock = f"{store.p}job:{job.id}:lock"
        stale_owner = store.r.get(lock)
        store.r.set(lock, "another-worker@test:1", px=600_000)
        before = store.events(job.id)
        record = store.get(job.id)
        for leftover in leftovers(destination):
            shutil.rmtree(destination.parent / leftover)
        worker.kill(signal.SIGCONT)
        wait_for(lambda: "left to whoever holds it" in worker.output(), timeout=60,
                 what="the stale attempt to stop")
        time.sleep(2 * HEARTBEAT_S)
        assert store.events(job.id) == before, worker.output()[-3000:]
        assert store.get(job.id) == record  # still `running`, progress where it stopped
        assert not destination.exists() and leftovers(destination) == []
        assert store.lock_owner(job.id) == "another-worker@test:1"  # not released by it
        assert stale_owner and stale_owner.startswith(worker.args[2])

        # the lock's holder goes away: the job is requeued and run to the end
        store.r.delete(lock)
        done = wait_for(lambda: (r := store.get(job.id)) and r.status in TERMINAL and r,
                        timeout=120, interval=0.1, what="the job to end")
    finally:
        worker.stop()
    assert done.status == "succeeded", worker.output()[-3000:]
    statuses = [e.data["status"] for e in store.events(job.id) if e.type == "state"]
    assert statuses == ["queued", "validating", "running", "queued", "validating", "running",
                        "succeeded"]
    assert (destination / "model.safetensors.index.json").is_file()
    assert leftovers(destination) == []


def test_a_queued_job_whose_message_was_lost_is_sent_again(
        service: Service, minilm_inputs: Inputs, tmp_path: Path) -> None:
    """The API died between storing the job and sending it: the reaper sends it."""
    spec = JobSpec.model_validate(spec_body(minilm_inputs, tmp_path / "out", name="unsent"))
    job = service.store.create(spec, queue="cpu")  # stored, never sent
    record = service.wait_terminal(job.id, timeout=90)
    assert record.status == "succeeded"
    assert "sent again" in service.worker_logs()


def test_a_job_waiting_in_the_broker_is_not_sent_again(service: Service, minilm_inputs: Inputs,
                                                       tmp_path: Path) -> None:
    """A job that waits its turn (here on `gpu`, which no test worker serves) has its message
    in the broker: past the re-send grace (6 heartbeats) the reaper still leaves it alone."""
    from workers.celery_app import task_ids_in_broker

    job = submit(service, spec_body(minilm_inputs, tmp_path / "out", name="waiting",
                                    options={"device": "cuda"}))
    assert service.store.internal(job["id"])["queue"] == "gpu"
    assert job["id"] in task_ids_in_broker(service.store.r)
    time.sleep(9 * HEARTBEAT_S)
    messages = [m for m in service.store.r.lrange("gpu", 0, -1) if job["id"] in m]
    assert len(messages) == 1
    assert f"job {job['id']}: queued for over" not in service.worker_logs()
    with service.client() as http:
        assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_adarank_stages_are_running(service: Service, minilm_inputs: Inputs,
                                    tmp_path: Path) -> None:
    """AdaRank factorizes and optimizes before its per-tensor loop: that is the job's heavy
    work, and the job is `running` while it does it."""
    from examples.tasks.evaluate import TASKS_DIR

    tasks = {n: TASKS_DIR / n for n in ("wordnet_pos", "word_pos")}
    body = {"name": "adarank-stages", "base": str(minilm_inputs.base),
            "models": [{"source": str(p / "adapter"), "name": n} for n, p in tasks.items()],
            "method": {"name": "adarank", "params": {"steps": 2, "batch_size": 4}},
            "calibration": {n: {"path": str(p / "calibration.jsonl"), "max_samples": 8}
                            for n, p in tasks.items()},
            "output": {"destination": str(tmp_path / "out")}, "options": {"device": "cpu"}}
    job = submit(service, body)
    assert service.wait_terminal(job["id"]).status == "succeeded"
    status, seen = None, set()
    for event in service.store.events(job["id"]):
        if event.type == "state":
            status = event.data["status"]
        elif event.data["stage"] in {"factorizing", "optimizing"}:
            seen.add(event.data["stage"])
            assert status == "running", event
    assert seen == {"factorizing", "optimizing"}


def test_progress_and_state_are_written_only_by_the_lock_holder_of_an_active_job(
        service: Service, minilm_inputs: Inputs, tmp_path: Path) -> None:
    store = service.store
    spec = JobSpec.model_validate(spec_body(minilm_inputs, tmp_path / "out", name="held"))
    job = store.create(spec, queue="nowhere")  # no worker serves it: stays queued
    progress = JobProgress(stage="merging", done=1, total=2)
    events = len(store.events(job.id))
    assert not store.set_progress(job.id, progress)  # queued: no one runs it
    assert store.acquire_lock(job.id, "mine", 60)
    assert store.transition(job.id, "validating", {"queued"}, owner="theirs") is None
    assert store.transition(job.id, "validating", {"queued"}, owner="mine") is not None
    assert not store.set_progress(job.id, progress, owner="theirs")
    assert not store.set_report(job.id, {"x": 1}, owner="theirs")
    assert store.set_progress(job.id, progress, owner="mine")
    assert store.get(job.id).progress == progress
    assert len(store.events(job.id)) == events + 2  # validating, then one progress
    store.r.delete(f"{store.p}job:{job.id}:lock")
    assert store.transition(job.id, "failed", ACTIVE, owner="mine") is None
    assert store.transition(job.id, "cancelled", ACTIVE) is not None
    assert not store.set_progress(job.id, progress)  # ended: nothing more is written
    assert len(store.events(job.id)) == events + 3


def test_job_records_survive_an_api_restart(service: Service, minilm_inputs: Inputs,
                                            tmp_path: Path) -> None:
    job = submit(service, spec_body(minilm_inputs, tmp_path / "out"))
    service.wait_terminal(job["id"])
    service.api.stop()
    from tests.service.conftest import start_api

    service.api, service.url = start_api(service.env, service.logs)
    with ServiceClient(service.url, KEYS["read"]) as client:
        assert client.job(job["id"])["status"] == "succeeded"
    with httpx.Client(base_url=service.url) as http:
        assert http.get("/readyz").status_code == 200


SCHED_OTHER, SCHED_IDLE = 0, 5


def scheduling(pid: int) -> list[tuple[int, int]]:
    """(policy, nice) of each thread of a process, from /proc (fields 19 and 41 of `stat`)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        found.append((int(fields[38]), int(fields[16])))
    return found


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_merges_run_at_idle_cpu_priority(service: Service) -> None:
    """The pool child, where merges run, is SCHED_IDLE in every thread; the worker's main
    process (heartbeats, reaping) keeps the normal policy."""
    worker = next(w for w in service.workers if w.alive())
    assert scheduling(worker.pid)[0] == (SCHED_OTHER, 0)
    pool = wait_for(lambda: children(worker.pid), timeout=30, what="the worker's pool child")
    for child in pool:
        assert set(scheduling(child)) == {(SCHED_IDLE, 0)}, child


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize(("priority", "expected"), [("idle", (SCHED_IDLE, 0)),
                                                     ("low", (SCHED_OTHER, 10)),
                                                     ("normal", (SCHED_OTHER, 0))])
def test_job_cpu_priority_setting(priority: str, expected: tuple[int, int]) -> None:
    probe = ("import os; from workers.celery_app import _lower_job_priority as lower; lower(); "
             "print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))")
    env = {**os.environ, "MERGE_SERVICE_JOB_CPU_PRIORITY": priority}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert (int(out[0]), int(out[1])) == expected


@pytest.fixture
def worker_side(redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> JobStore:
    """An empty database of its own, and this process's environment pointed at it, as a
    worker's is: for calling worker code (`run_job`, the task's handlers) in-process."""
    url = redis_url(redis_server, 14)
    store = JobStore.from_url(url)
    store.r.flushdb()
    monkeypatch.setenv("MERGE_SERVICE_REDIS_URL", url)
    monkeypatch.setenv("MERGE_SERVICE_DATA_DIR", str(tmp_path / "data"))
    return store


def test_the_soft_time_limit_is_named_also_where_it_interrupted_a_push() -> None:
    """Celery raises it inside whatever runs: in the Hub client it becomes the cause of a
    HubPushError, which must still fail the job as TimeLimitExceeded, not as a push error."""
    from celery.exceptions import SoftTimeLimitExceeded

    from merge_service.errors import HubPushError
    from workers.runner import time_limit_hit

    def push() -> None:
        try:
            raise SoftTimeLimitExceeded()
        except Exception as exc:
            raise HubPushError("cannot push to Hub repo acme/x: SoftTimeLimitExceeded()") from exc

    with pytest.raises(HubPushError) as pushed:
        push()
    assert time_limit_hit(pushed.value)
    assert time_limit_hit(SoftTimeLimitExceeded())
    assert not time_limit_hit(HubPushError("cannot push to Hub repo acme/x: 500"))


def test_the_hard_time_limit_fails_only_the_killed_child_s_own_attempt(
        worker_side: JobStore, minilm_inputs: Inputs, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the worker's main process does when billiard kills a child at the hard time limit
    (`JobRequest.on_timeout` notes the child, `JobTask.on_failure` runs): the job fails if the
    killed child still held it, and is left alone if another attempt holds it or the reaper
    already queued it again."""
    from celery.exceptions import TimeLimitExceeded

    import workers.liveness
    import workers.tasks

    store = worker_side
    monkeypatch.setenv("MERGE_SERVICE_MAX_JOB_SECONDS", "90")
    monkeypatch.setattr(workers.liveness, "worker_name", lambda: "w1@test")
    spec = JobSpec.model_validate(spec_body(minilm_inputs, tmp_path / "out"))

    def running(owner: str | None) -> str:
        job = store.create(spec, queue="nowhere")
        if owner is not None:
            assert store.acquire_lock(job.id, owner, 60)
        assert store.transition(job.id, "running", {"queued"}) is not None
        return job.id

    def hard_limit(job_id: str, child_pid: int) -> None:
        workers.tasks._timed_out[job_id] = child_pid  # what on_timeout(soft=False) records
        workers.tasks.run.on_failure(TimeLimitExceeded(150.0), job_id, (job_id,), {}, None)
        assert job_id not in workers.tasks._timed_out

    held = running("w1@test:4242")
    hard_limit(held, 4242)
    record = store.get(held)
    assert record.status == "failed" and record.error is not None
    assert record.error.type == "TimeLimitExceeded"
    assert "MERGE_SERVICE_MAX_JOB_SECONDS (90 s)" in record.error.message

    expired = running(None)  # the child's lock had already run out: still its attempt
    hard_limit(expired, 4243)
    assert store.get(expired).status == "failed"

    taken = running("w2@test:777")  # a rerun elsewhere holds it: the killed child had lost it
    hard_limit(taken, 4244)
    assert store.get(taken).status == "running"

    requeued = store.create(spec, queue="nowhere")  # the reaper put it back: a rerun's to run
    hard_limit(requeued.id, 4245)
    assert store.get(requeued.id).status == "queued"


def test_a_job_cancelled_before_a_worker_starts_it_runs_nothing(
        worker_side: JobStore, minilm_inputs: Inputs, tmp_path: Path) -> None:
    """`run_job` as a worker child calls it, on jobs the API was cancelling when the message
    arrived: the flag is set and the job still queued (between the API's two steps), or the
    job already cancelled. Neither starts, and the lock is let go."""
    from workers.runner import run_job

    store = worker_side
    spec = JobSpec.model_validate(spec_body(minilm_inputs, tmp_path / "out"))

    flagged = store.create(spec, queue="nowhere")
    store.request_cancel(flagged.id)
    assert run_job(flagged.id, worker="w1@test") == "cancelled before it started"
    record = store.get(flagged.id)
    assert record.status == "cancelled" and record.started_at is None
    assert store.lock_owner(flagged.id) is None

    cancelled = store.create(spec, queue="nowhere")
    store.request_cancel(cancelled.id)
    assert store.transition(cancelled.id, "cancelled", {"queued"}) is not None
    assert run_job(cancelled.id, worker="w1@test") == "already cancelled"
    assert store.get(cancelled.id).status == "cancelled"
    assert not (tmp_path / "out").exists()


def test_a_job_whose_hub_token_secret_is_gone_fails_naming_it(
        worker_side: JobStore, minilm_inputs: Inputs, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A schedule's job runs with its `hf_token_secret`, read when the job starts: removed
    since the job was queued, the job fails naming the secret (never a token), and writes
    nothing."""
    from merge_service.settings import Settings
    from workers.runner import run_job

    store = worker_side
    monkeypatch.setenv("MERGE_SERVICE_SECRETS_DIR", str(tmp_path / "secrets"))
    spec = JobSpec.model_validate(spec_body(minilm_inputs, tmp_path / "out"))
    job = store.create(spec, queue="nowhere", hub_secret="customer-hub")
    assert store.internal(job.id)["hub_secret"] == "customer-hub"
    assert "customer-hub" not in store.get(job.id).model_dump_json()  # kept out of the record

    assert run_job(job.id, worker="w1@test") == "failed: PreflightError"
    record = store.get(job.id)
    assert record.status == "failed" and record.error is not None
    assert "cannot read the Hub token secret 'customer-hub'" in record.error.message
    assert not (tmp_path / "out").exists()

    for name in ("../etc/passwd", ".hidden", ""):
        with pytest.raises(PreflightError, match="is not a secret's name"):
            Settings(secrets_dir=tmp_path).hub_for(name)


def test_jobs_that_ended_before_the_retention_cutoff_are_deleted(
        worker_side: JobStore, minilm_inputs: Inputs, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    import workers.liveness

    store = worker_side
    spec = JobSpec.model_validate(spec_body(minilm_inputs, tmp_path / "out", name="kept-or-not"))

    def ended(status: str, finished: datetime) -> str:
        job = store.create(spec, queue="nowhere")
        assert store.transition(job.id, status, {"queued"},
                                finished_at=finished.isoformat()) is not None
        return job.id

    now = datetime.now(UTC)
    old = ended("succeeded", now - timedelta(days=10))
    assert store.set_report(old, {"x": 1}) is False  # ended: reports come before the end
    store.r.set(f"{store.p}job:{old}:report", "{}")
    late = ended("failed", now + timedelta(days=2))  # ends after the cutoff: kept
    queued = store.create(spec, queue="nowhere").id  # not ended: kept

    assert store.delete_ended_before(now + timedelta(days=1)) == [old]
    assert store.get(old) is None and store.get_report(old) is None
    assert store.r.exists(store.events_key(old)) == 0
    listed = [j.id for j in store.list(limit=50)[0]]
    assert listed == [queued, late]
    assert [j.id for j in store.list(name="kept-or-not", limit=50)[0]] == [queued, late]
    assert [j.id for j in store.list(status="failed", limit=50)[0]] == [late]
    # a job created after the cutoff is not looked at, whatever its end
    ended("cancelled", now - timedelta(days=10))
    assert store.delete_ended_before(now - timedelta(days=1)) == []

    # the worker's liveness thread does it with MERGE_SERVICE_JOB_RETENTION_DAYS, hourly
    liveness = workers.liveness.Liveness(None, "w1@test", ["cpu"])
    a_second = 1 / 86400  # in days: the jobs below were created over a second before
    first = ended("succeeded", now - timedelta(days=3))
    time.sleep(1.1)
    liveness.expire(None)  # unset: kept
    assert store.get(first) is not None
    liveness.expire(a_second)
    assert store.get(first) is None
    second = ended("succeeded", now - timedelta(days=3))
    time.sleep(1.1)
    liveness.expire(a_second)  # within the hour: not yet
    assert store.get(second) is not None


def test_job_ids_sort_in_the_order_they_were_made_also_within_a_millisecond(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.jobs
    from workers.jobs import new_job_id

    ids = [new_job_id() for _ in range(20_000)]  # many per millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 20 and int(i, 16) >= 0 for i in ids)
    # a clock that stepped back does not reorder them either
    monkeypatch.setattr(workers.jobs.time, "time", lambda: 1_000_000.0)
    before = new_job_id()
    assert before > ids[-1]
    # a child forked in the same millisecond does not go on from its parent's suffix (both
    # would make the same id)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_job_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 20).decode()
    assert new_job_id() != child
