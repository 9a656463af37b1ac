"""`merge-service up` as a user runs it: embedded Redis, API and worker from one command; a
merge submitted with `merge-service submit --wait`; Ctrl-C stops everything; the job records
are still there at the next start."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import Inputs, Process, slow_spec, spec_body, wait_for
from workers.redis_server import free_port

pytestmark = pytest.mark.slow


def service_processes(up_log: str, data_dir: Path) -> list[int]:
    """The embedded Redis (by its port, from the banner) and the worker processes (by their
    environment)."""
    match = re.search(r"redis://127\.0\.0\.1:(\d+)/0", up_log)
    assert match, up_log
    redis_title = f"127.0.0.1:{match[1]}"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ("redis-server" in cmdline and redis_title in cmdline) or (
                "worker" in cmdline and f"MERGE_SERVICE_DATA_DIR={data_dir}".encode() in environ):
            found.append(int(entry.name))
    return found


def start_up(env: dict[str, str], port: int, log: Path) -> tuple[Process, str]:
    up = Process(["up", "--port", str(port)], env, log).start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert up.alive(), up.output()[-3000:]
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, timeout=120, interval=0.2, what="merge-service up")
    return up, url


def interrupt(up: Process, sig: int = signal.SIGINT) -> int:
    """Ctrl-C: SIGINT to `up` alone (it stops its children itself)."""
    assert up.process is not None
    up.process.send_signal(sig)
    return up.process.wait(60)


def test_up_submit_wait_ctrl_c_and_restart(minilm_inputs: Inputs, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGE_SERVICE_")}
    env |= {"MERGE_SERVICE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}
    port = free_port()
    up, url = start_up(env, port, tmp_path / "up.log")
    try:
        banner = up.output()
        assert f"API:    {url}" in banner and "embedded" in banner
        assert f"dashboard: {url}/\n" in banner

        spec = tmp_path / "spec.yaml"
        spec.write_text(json.dumps(spec_body(minilm_inputs, tmp_path / "merged")))
        submitted = subprocess.run(
            [sys.executable, "-m", "merge_service.cli", "submit", str(spec), "--wait",
             "--url", url, "--json"], env=env, capture_output=True, text=True, timeout=300)
        assert submitted.returncode == 0, submitted.stderr
        record = json.loads(submitted.stdout)
        assert record["status"] == "succeeded"
        assert "job " in submitted.stderr
        assert (tmp_path / "merged" / "config.json").is_file()
        running = service_processes(up.output(), data_dir)
        assert len(running) >= 2  # Redis, the worker (and its pool child)

        assert interrupt(up) == 0
        assert service_processes(up.output(), data_dir) == []  # all stopped
        assert "stopping" in up.output()

        up, url = start_up(env, port, tmp_path / "up2.log")  # the records survived
        job = httpx.get(f"{url}/v1/jobs/{record['id']}").json()
        assert job["status"] == "succeeded"
        assert job["result"] == record["result"]
        assert interrupt(up, signal.SIGTERM) == 0  # as docker or systemd stop it
        assert service_processes(up.output(), data_dir) == []
    finally:
        up.stop()


def test_ctrl_c_lets_the_running_job_go_on(minilm_inputs: Inputs, tmp_path: Path) -> None:
    """Ctrl-C during a merge: the worker's warm shutdown lets the job go on (the warm signal
    goes to the worker's main process alone; its pool child would die of it at once)."""
    from workers.jobs import JobStore

    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGE_SERVICE_")}
    env |= {"MERGE_SERVICE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}
    up, url = start_up(env, free_port(), tmp_path / "up.log")
    redis = re.search(r"Redis:\s+(redis://\S+)", up.output())
    assert redis is not None
    store = JobStore.from_url(redis[1])
    try:
        job = httpx.post(f"{url}/v1/jobs", json=slow_spec(minilm_inputs, tmp_path / "merged"),
                         timeout=120).json()

        def done() -> int:
            record = store.get(job["id"])
            return record.progress.done if record and record.progress \
                and record.progress.stage == "merging" else 0

        wait_for(lambda: done() > 0, timeout=120, interval=0.02, what="the merge to start")
        assert up.process is not None
        up.process.send_signal(signal.SIGINT)  # up stops the API and the scheduler first
        log = data_dir / "logs" / "worker.log"
        wait_for(lambda: "Warm shutdown" in log.read_text(), timeout=30, interval=0.01,
                 what="the worker's warm shutdown")
        at_signal = done()

        def moved_on() -> bool:
            # on a loaded machine the merge may be at its last tensors by now: leaving the
            # merging stage, or succeeding, counts as going on as much as two more tensors
            record = store.get(job["id"])
            if record is None or record.status in ("failed", "cancelled"):
                return False
            progress = record.progress
            return record.status == "succeeded" or (progress is not None and (
                progress.stage != "merging" or progress.done > at_signal + 1))

        wait_for(moved_on, timeout=30, interval=0.02,
                 what="the merge to go on after the worker was told to stop")
        assert up.process.wait(60) == 0
        assert service_processes(up.output(), data_dir) == []
    finally:
        store.r.close()
        up.stop()


def test_ctrl_c_twice_stops_as_once(tmp_path: Path) -> None:
    """An impatient second Ctrl-C: the same clean stop, no traceback (uvicorn's force exit and
    its re-raise of the signals printed one)."""
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGE_SERVICE_")}
    env |= {"MERGE_SERVICE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    up, _ = start_up(env, free_port(), tmp_path / "up.log")
    try:
        assert up.process is not None
        up.process.send_signal(signal.SIGINT)
        time.sleep(0.02)
        assert interrupt(up) == 0
        assert "Traceback" not in up.output(), up.output()
        assert service_processes(up.output(), data_dir) == []
    finally:
        up.stop()


def test_a_second_up_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    from merge_service.cli import main as cli

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    import fcntl

    with (data_dir / "up.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        env_before = os.environ.get("MERGE_SERVICE_DATA_DIR")
        os.environ["MERGE_SERVICE_DATA_DIR"] = str(data_dir)
        handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            assert cli(["up", "--port", str(free_port())]) == 1
            # this process's own Ctrl-C and SIGTERM are as they were
            assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
        finally:
            if env_before is None:
                os.environ.pop("MERGE_SERVICE_DATA_DIR")
            else:
                os.environ["MERGE_SERVICE_DATA_DIR"] = env_before


@pytest.mark.parametrize("command", ["up", "api"])
def test_a_port_in_use_is_a_clear_error_before_anything_starts(command: str,
                                                               tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGE_SERVICE_")}
    env |= {"MERGE_SERVICE_DATA_DIR": str(data_dir),
            "MERGE_SERVICE_REDIS_URL": "redis://127.0.0.1:1/0"}  # never reached
    if command == "up":
        del env["MERGE_SERVICE_REDIS_URL"]  # `up` would start an embedded one
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "merge_service.cli", command, "--port",
                               str(port)], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port}: Address already "
                                   "in use: another server (another `merge-service up`?) uses "
                                   "it; choose a port with --port")
    assert "is up" not in done.stdout
    assert not (data_dir / "redis").exists() and not (data_dir / "logs").exists()


def test_up_restarts_a_dead_worker_and_leaves_nothing_when_killed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGE_SERVICE_")}
    env |= {"MERGE_SERVICE_DATA_DIR": str(data_dir), "MERGE_SERVICE_HEARTBEAT_SECONDS": "1",
            "PYTHONUNBUFFERED": "1"}
    up, url = start_up(env, free_port(), tmp_path / "up.log")
    try:
        first = httpx.get(f"{url}/readyz").json()["workers"][0]["pid"]
        os.kill(first, signal.SIGKILL)

        def restarted() -> bool:
            workers = httpx.get(f"{url}/readyz").json()["workers"]
            return any(w["pid"] != first for w in workers)

        wait_for(restarted, timeout=120, interval=0.2, what="a new worker")
        assert "restarting it" in up.output()
        up.kill(signal.SIGKILL)  # no chance to clean up: its children go with it
        assert up.process is not None and up.process.wait(10) == -signal.SIGKILL
        wait_for(lambda: service_processes(up.output(), data_dir) == [], timeout=60,
                 interval=0.2, what="Redis and the worker to exit")
    finally:
        up.stop()
