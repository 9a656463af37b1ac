"""`merge-service up`: Redis (the configured URL, else an embedded server under DATA_DIR), one
worker, the scheduler and the API, from one command; Ctrl-C stops them in order (API,
scheduler, worker, Redis).

A job that was running when the service stopped is picked up again at the next start (its
worker's lock has expired; the new worker's reaper requeues it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from merge_service.errors import InvalidInputError
from workers.redis_server import die_with_parent

WORKER_RESTARTS = 5


class Supervised:
    """The worker (or the scheduler) as a child process in its own session, restarted if it
    dies."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path,
                 name: str = "worker") -> None:
        self.command, self.env, self.log, self.name = command, env, log, name
        self.process: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.restarts = 0

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._watch, name=f"{self.name}-watch", daemon=True).start()

    def _spawn(self) -> None:
        # the parent-death signal follows the thread that forks: always this one or `_watch`,
        # which both live as long as the child they start
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=die_with_parent)

    def _watch(self) -> None:
        while True:
            assert self.process is not None
            code = self.process.wait()
            if self.stopping.is_set():
                return
            if self.restarts >= WORKER_RESTARTS:
                print(f"merge-service: the {self.name} exited ({code}) {self.restarts} times; "
                      f"not restarted again (see {self.log})", file=sys.stderr, flush=True)
                return
            self.restarts += 1
            print(f"merge-service: the {self.name} exited ({code}); restarting it (see "
                  f"{self.log})", file=sys.stderr, flush=True)
            self._spawn()

    def stop(self, warm_s: float = 10.0) -> None:
        """Warm shutdown (finish the current job) for `warm_s`, then cold, then kill. The
        first two go to the main process alone, as `docker stop` sends them: Celery's pool
        children reset SIGTERM to its default, and one sent to the whole group would end the
        running job at once instead of letting the main process wait for it."""
        self.stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait_s, send in ((signal.SIGTERM, warm_s, os.kill),
                                  (signal.SIGQUIT, 5.0, os.kill),
                                  (signal.SIGKILL, 5.0, os.killpg)):
            try:
                send(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _api_server(config: Any) -> Any:
    """uvicorn's server, less two things a second Ctrl-C set off, each ending in a traceback:
    its force exit (which leaves the app's lifespan to be cancelled; the graceful shutdown is
    bounded by `timeout_graceful_shutdown` anyway) and its re-raise of the signals it handled
    once it is done (inside its event loop). `up` goes on to stop its children instead."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            self.should_exit = True

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)


def run_up(host: str, port: int, log_level: str) -> int:
    """The service until Ctrl-C (or SIGTERM); the caller's signal handlers are restored at the
    end, whichever way it ends (the tests call it in their own process)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_up(host, port, log_level)
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: not set from Python; nothing to restore
                signal.signal(sig, handler)


def _run_up(host: str, port: int, log_level: str) -> int:
    import uvicorn

    from api.app import create_app
    from api.cli import check_bind, listen
    from merge_service.settings import Settings
    from workers.redis_server import EmbeddedRedis

    settings = Settings()
    check_bind(host, settings)
    # uvicorn re-raises the signal that stopped it once it is done; SIGTERM's default action
    # would then end this process before it stops the worker and Redis
    signal.signal(signal.SIGTERM, _interrupt)
    data_dir = settings.data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = (data_dir / "up.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InvalidInputError(f"another `merge-service up` is running with DATA_DIR "
                                f"{data_dir}") from None
    try:
        sock = listen(host, port)
    except InvalidInputError:
        lock.close()
        raise

    embedded = None
    worker = None
    scheduler = None
    try:
        if settings.redis_url:
            redis_url, where = settings.redis_url, "MERGE_SERVICE_REDIS_URL"
        else:
            embedded = EmbeddedRedis(data_dir / "redis").start()
            redis_url = embedded.url
            where = f"{redis_url} (embedded, data in {data_dir / 'redis'})"
        env = {**os.environ, "MERGE_SERVICE_REDIS_URL": redis_url,
               "MERGE_SERVICE_DATA_DIR": str(data_dir)}
        logs = data_dir / "logs"
        logs.mkdir(exist_ok=True)
        worker = Supervised([sys.executable, "-m", "merge_service.cli", "worker"], env,
                            logs / "worker.log")
        worker.start()
        scheduler = Supervised([sys.executable, "-m", "merge_service.cli", "scheduler"], env,
                               logs / "scheduler.log", name="scheduler")
        scheduler.start()
        api_settings = Settings(redis_url=redis_url, data_dir=data_dir)
        app = create_app(api_settings)
        shown = f"[{host}]" if ":" in host else host
        print(f"merge-service is up\n"
              f"  dashboard: http://{shown}:{port}/\n"
              f"  API:    http://{shown}:{port}  (docs: http://{shown}:{port}/docs)\n"
              f"  Redis:  {where}\n"
              f"  worker: log in {logs / 'worker.log'}\n"
              f"  scheduler: log in {logs / 'scheduler.log'}\n"
              f"  data:   {data_dir}\n"
              "Ctrl-C stops it.", flush=True)
        server = _api_server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                            timeout_graceful_shutdown=3))
        server.run(sockets=[sock])
        return 0 if server.started else 2
    finally:
        # another Ctrl-C does not cut the stop short: it is bounded (each child has 10 s to
        # finish its job, then 5 s, then is killed), and it stops Redis last
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("merge-service: stopping", file=sys.stderr, flush=True)
        if scheduler is not None:
            scheduler.stop()
        if worker is not None:
            worker.stop()
        if embedded is not None:
            embedded.stop()
        sock.close()
        lock.close()
