"""In each worker's main process: a heartbeat (the worker record that routing and `/readyz`
read), a reaper that puts back in the queue the jobs whose worker died, and, with
`MERGE_SERVICE_JOB_RETENTION_DAYS`, the deletion of jobs that ended longer ago.

A job's lock expires three heartbeats after its worker stopped refreshing it; any live worker's
reaper then moves the job from `validating`/`running`/`pushing` back to `queued` (one reaper
wins: the change is a Redis transaction) and sends it again.

A job can also sit `queued` with no message for it in the broker: the API died between storing
the job and sending it, a send failed, or a pool child died holding the job's lock so that the
redelivery was dropped. The reaper sends again a queued job that holds no lock, was last sent
more than `RESEND_GRACE_BEATS` heartbeats ago (then twice that, and so on), and has no message
in the broker, waiting or delivered: a job that waits its turn behind others, or for a `gpu`
worker, is left alone. A duplicate that slips through anyway (a delivery in flight while the
broker was read) is dropped by the lock and the terminal-state check.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from workers.celery_app import RUN_JOB, task_ids_in_broker
from workers.jobs import JobError, now, timestamp
from workers.runner import MAX_ATTEMPTS, context, fail

log = logging.getLogger("merge_service.worker")
RESEND_GRACE_BEATS = 6  # twice a job lock's lifetime: a minute at the default heartbeat
EXPIRE_EVERY_S = 3600.0


class Liveness(threading.Thread):
    def __init__(self, app: Any, name: str, queues: list[str]) -> None:
        super().__init__(name="merge-service-liveness", daemon=True)
        self.app, self.worker_name, self.queues = app, name, queues
        self.stopped = threading.Event()
        self.expired_at = -float("inf")
        self.info = {"name": name, "hostname": socket.gethostname(), "pid": os.getpid(),
                     "queues": queues, "started_at": timestamp()}

    def run(self) -> None:
        settings, _ = context()
        interval = settings.heartbeat_seconds
        while True:
            started = time.monotonic()
            try:
                self.beat(3 * interval)
                self.reap()
                self.resend(RESEND_GRACE_BEATS * interval)
                self.expire(settings.job_retention_days)
            except Exception:
                log.warning("heartbeat or reaper failed; trying again", exc_info=True)
            if self.stopped.wait(max(0.0, interval - (time.monotonic() - started))):
                return

    def beat(self, ttl: float) -> None:
        _, store = context()
        store.worker_heartbeat(self.worker_name, self.info, ttl)

    def reap(self) -> None:
        _, store = context()
        for job_id in store.orphaned_jobs():
            attempts = store.internal(job_id)["attempts"]
            if attempts >= MAX_ATTEMPTS:
                fail(store, job_id, JobError(
                    type="WorkerLost", message=f"the job was interrupted {attempts} times "
                    "(its worker died each time); not retried again",
                    details={"attempts": attempts}))
                continue
            record = store.requeue_orphan(job_id)
            if record is None:
                continue  # another reaper, or a redelivery, got there first
            queue = store.internal(job_id)["queue"] or "cpu"
            log.warning("job %s: its worker died; requeued on %s", job_id, queue)
            self.send(job_id, queue)  # if this fails, `resend` tries again after the grace

    def resend(self, grace_s: float) -> None:
        _, store = context()
        candidates = store.unsent_jobs(grace_s)
        if not candidates:
            return
        in_broker = task_ids_in_broker(store.r)
        for job_id, sent_at in candidates:
            if job_id in in_broker:
                continue  # its message waits in the queue, or a worker holds it
            queue = store.claim_resend(job_id, sent_at)
            if queue is None:
                continue  # started, cancelled, or re-sent by another reaper meanwhile
            log.warning("job %s: queued for over %.0f s and not started; sent again on %s",
                        job_id, grace_s, queue)
            self.send(job_id, queue)

    def expire(self, retention_days: float | None) -> None:
        """At most once an hour, with `JOB_RETENTION_DAYS` set: delete the jobs that ended
        longer ago (any worker may; each deletion is a transaction)."""
        if retention_days is None or time.monotonic() - self.expired_at < EXPIRE_EVERY_S:
            return
        self.expired_at = time.monotonic()
        _, store = context()
        cutoff = now() - timedelta(days=retention_days)
        while deleted := store.delete_ended_before(cutoff):
            log.info("deleted %d job(s) that ended before %s", len(deleted), cutoff.isoformat())

    def send(self, job_id: str, queue: str) -> None:
        try:
            self.app.send_task(RUN_JOB, args=[job_id], task_id=job_id, queue=queue)
        except Exception:
            log.warning("job %s: cannot send it to %s", job_id, queue, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()
        try:
            context()[1].worker_gone(self.worker_name)
        except Exception:
            log.warning("cannot remove the worker record", exc_info=True)


_liveness: Liveness | None = None


def worker_name() -> str | None:
    """This worker's name, in its main process once it is ready (None elsewhere)."""
    return _liveness.worker_name if _liveness is not None else None


@worker_ready.connect
def _start(sender: Any, **_: Any) -> None:
    global _liveness
    queues = sorted(q.name for q in sender.task_consumer.queues)
    _liveness = Liveness(sender.app, sender.hostname, queues)
    _liveness.start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _liveness is not None:
        _liveness.stop()
