"""The service commands of `merge-service`: `up`, `api`, `worker`, `scheduler`, `submit`
(DESIGN.md section 3). Heavy imports (FastAPI, Celery, uvicorn) stay inside the commands so that
`merge-service merge` starts as fast as before."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from merge_service.errors import InvalidInputError

EXIT_OK, EXIT_INVALID, EXIT_FAILED = 0, 1, 2
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def add_service_commands(sub: Any) -> None:
    up = sub.add_parser("up", help="the whole service on this machine: Redis, API, one "
                        "worker, the scheduler")
    up.add_argument("--host", default=DEFAULT_HOST, help=f"the API's address (default "
                    f"{DEFAULT_HOST}; another needs MERGE_SERVICE_API_KEYS)")
    up.add_argument("--port", type=int, default=DEFAULT_PORT,
                    help=f"the API's port (default {DEFAULT_PORT})")
    up.add_argument("--log-level", default="info", help="the API's log level (default info)")
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="the REST API alone (needs Redis and workers)")
    api.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default "
                     f"{DEFAULT_HOST}; another needs MERGE_SERVICE_API_KEYS)")
    api.add_argument("--port", type=int, default=DEFAULT_PORT,
                     help=f"port to listen on (default {DEFAULT_PORT})")
    api.add_argument("--log-level", default="info", help="default info")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="a Celery worker that runs jobs")
    worker.add_argument("--queues", help="gpu, cpu, gpu,cpu or auto (default: "
                        "MERGE_SERVICE_WORKER_QUEUES; auto = gpu,cpu with CUDA, else cpu)")
    worker.add_argument("--concurrency", type=int, default=1,
                        help="jobs at once, one child process each (default 1)")
    worker.add_argument("--name", help="node name (default merge-PID@HOST)")
    worker.add_argument("--log-level", default="info", help="default info")
    worker.set_defaults(func=cmd_worker)

    scheduler = sub.add_parser("scheduler", help="fire the scheduled merges (Celery beat "
                               "on Redis; several may run, one fires at a time)")
    scheduler.add_argument("--log-level", default="info", help="default info")
    scheduler.set_defaults(func=cmd_scheduler)

    submit = sub.add_parser("submit", help="submit a job spec to a running service")
    submit.add_argument("spec", help="job spec (YAML or JSON)")
    submit.add_argument("--out", help="destination (overrides output.destination)")
    submit.add_argument("--wait", action="store_true", help="follow progress until it ends")
    submit.add_argument("--url", help="the API (default MERGE_SERVICE_API_URL or "
                        f"http://{DEFAULT_HOST}:{DEFAULT_PORT})")
    submit.add_argument("--idempotency-key", help="resubmitting with the same key returns the "
                        "same job")
    submit.add_argument("--json", action="store_true", help="print the job record as JSON")
    submit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    submit.set_defaults(func=cmd_submit)


# --- api -----------------------------------------------------------------------------------

def check_bind(host: str, settings: Any) -> None:
    """Local mode (no API key configured) serves this machine only."""
    from api.auth import parse_api_keys

    try:
        keys = parse_api_keys(settings.api_keys)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    if not keys and not is_loopback(host):
        raise InvalidInputError(
            f"refusing to listen on {host}: with no MERGE_SERVICE_API_KEYS configured the API "
            "is in local mode and binds 127.0.0.1 only; configure keys "
            "(MERGE_SERVICE_API_KEYS='KEY:admin,KEY2:read') to serve other machines")


def listen(host: str, port: int) -> socket.socket:
    """The API's socket, bound before anything else starts: a port in use is a clear error at
    once, not a server log line after Redis and the worker are up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = (": another server (another `merge-service up`?) uses it; choose a port with "
                "--port" if exc.errno == errno.EADDRINUSE else "")
        raise InvalidInputError(f"cannot listen on {host}:{port}: "
                                f"{exc.strerror or exc}{hint}") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from merge_service.settings import Settings

    settings = Settings()
    check_bind(args.host, settings)
    sock = listen(args.host, args.port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=args.host, port=args.port,
                                           log_level=args.log_level,
                                           timeout_graceful_shutdown=3))
    server.run(sockets=[sock])
    return EXIT_OK if server.started else EXIT_FAILED


# --- worker --------------------------------------------------------------------------------

def cuda_present() -> bool:
    """Asked of a short-lived child process, so that CUDA is never initialised in the worker's
    main process (its children are forked from it)."""
    if not Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is None:
        return False
    probe = subprocess.run([sys.executable, "-c", "import torch; "
                            "print(torch.cuda.is_available() and torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=300)
    return probe.returncode == 0 and probe.stdout.strip() not in {"", "0", "False"}


def worker_queues(requested: str) -> list[str]:
    from workers.celery_app import QUEUES

    if requested.strip() == "auto":
        return ["gpu", "cpu"] if cuda_present() else ["cpu"]
    queues = [q.strip() for q in requested.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        raise InvalidInputError(f"unknown worker queue(s) {unknown or requested!r}: use gpu, "
                                "cpu, gpu,cpu or auto")
    return queues


def cmd_worker(args: argparse.Namespace) -> int:
    from merge_service.settings import Settings

    settings = Settings()
    queues = worker_queues(args.queues or settings.worker_queues)
    if args.concurrency < 1:
        raise InvalidInputError("--concurrency must be at least 1")
    from workers.celery_app import app

    name = args.name or f"merge-{os.getpid()}@{socket.gethostname()}"
    print(f"worker {name}: queues {','.join(queues)}, {args.concurrency} job(s) at a time, "
          f"Redis {_redacted(settings.redis_url_or_default)}", file=sys.stderr, flush=True)
    app.worker_main(["worker", "--pool", "prefork", "--concurrency", str(args.concurrency),
                     "--queues", ",".join(queues), "--hostname", name,
                     "--loglevel", args.log_level.upper(), "--without-gossip",
                     "--without-mingle"])
    return EXIT_OK


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


# --- scheduler -----------------------------------------------------------------------------

def cmd_scheduler(args: argparse.Namespace) -> int:
    from workers.schedules.beat import run_scheduler

    return run_scheduler(args.log_level)


# --- up ------------------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    from api.up import run_up

    return run_up(args.host, args.port, args.log_level)


# --- submit --------------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    from api.client import ServiceClient
    from merge_service.settings import Settings
    from merge_service.spec import load_spec

    settings = Settings()
    spec = load_spec(args.spec)  # the same schema errors as `merge`, before any request
    body = absolute_paths(spec.model_dump(mode="json", exclude_none=True), args.out)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    with ServiceClient(args.url or settings.api_url, key) as client:
        record = client.submit(body, idempotency_key=args.idempotency_key)
        print(f"job {record['id']}: {record['status']} ({client.url}/v1/jobs/{record['id']})",
              file=sys.stderr, flush=True)
        if args.wait:
            try:
                record = follow(client, record["id"], quiet=args.quiet, status=record["status"])
            except KeyboardInterrupt:  # the job is the service's: it goes on
                print(f"stopped following job {record['id']}; it goes on in the service "
                      f"(to stop it: POST {client.url}/v1/jobs/{record['id']}/cancel)",
                      file=sys.stderr)
                return EXIT_FAILED
    if args.json:
        print(json.dumps(record, indent=2))
    elif args.wait:
        print_outcome(record)
    else:
        print(record["id"])
    return exit_code(record) if args.wait else EXIT_OK


def absolute_paths(body: dict[str, Any], out: str | None) -> dict[str, Any]:
    """Local paths are the caller's: make them absolute before the service sees them."""
    from merge_service.sources.resolve import looks_local

    def fix(source: str) -> str:
        return str(Path(source).expanduser().resolve()) if looks_local(source) else source

    body["base"] = fix(body["base"])
    for model in body["models"]:
        model["source"] = fix(model["source"])
    output = body.setdefault("output", {})
    destination = out or output.get("destination")
    if destination and not destination.startswith("hub://"):
        destination = str(Path(destination).expanduser().resolve())
    if destination:
        output["destination"] = destination
    for entry in (body.get("calibration") or {}).values():
        entry["path"] = str(Path(entry["path"]).expanduser().resolve())
    return body


def follow(client: Any, job_id: str, quiet: bool = False,
           status: str | None = None) -> dict[str, Any]:
    """Show the job's progress (a bar per stage on stderr) until it ends; return the record.
    `status`: the one already shown."""
    from tqdm import tqdm

    bar, stage = None, None
    try:
        for event in client.events(job_id):
            data = event["data"]
            if event["type"] == "state" and data["status"] != status:
                status = data["status"]
                if bar is None and not quiet:
                    print(f"job {job_id}: {status}", file=sys.stderr, flush=True)
            elif event["type"] == "progress" and not quiet and data["stage"] == "merging":
                if stage != data["stage"]:
                    stage = data["stage"]
                    bar = tqdm(total=data["total"], desc=stage, unit="tensor", file=sys.stderr,
                               leave=False, disable=None)
                if bar is not None:
                    bar.update(data["done"] - bar.n)
    finally:
        if bar is not None:
            bar.close()
    return client.job(job_id)


def print_outcome(record: dict[str, Any]) -> None:
    status = record["status"]
    if status == "succeeded":
        result = record["result"]
        where = result.get("url") or result["destination"]
        print(f"succeeded: job {record['id']} -> {where} ({len(result['files'])} files)")
    elif status == "cancelled":
        print(f"cancelled: job {record['id']}; nothing was written")
    else:
        error = record.get("error") or {}
        print(f"failed: job {record['id']}: {error.get('type')}: {error.get('message')}")


def exit_code(record: dict[str, Any]) -> int:
    from merge_service import errors

    if record["status"] == "succeeded":
        return EXIT_OK
    user_errors = {c.__name__ for c in _subclasses(errors.InvalidInputError)}
    error_type = (record.get("error") or {}).get("type")
    return EXIT_INVALID if error_type in user_errors else EXIT_FAILED


def _subclasses(cls: type[Exception]) -> list[type[Exception]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found
