"""One job, start to end, around the library's one entry point `run_merge`.

The job record is the source of truth. A worker first takes the job's lock (a Redis key with a
short expiry, refreshed by a heartbeat thread): a second delivery of the same job, while the
first runs, finds the lock taken and leaves the job alone. When a worker dies its lock expires
and a reaper (`workers.liveness`) puts the job back in the queue; the rerun starts from
scratch and overwrites nothing but its own earlier attempt (outputs are deterministic, writes
are atomic, so a killed attempt leaves no partial output at the destination).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from functools import cache
from pathlib import Path

from merge_service.engine import Progress, run_merge
from merge_service.errors import InvalidInputError, MergeCancelled, MergeServiceError
from merge_service.settings import Settings
from workers.jobs import (
    ACTIVE,
    TERMINAL,
    JobError,
    JobProgress,
    JobRecord,
    JobResult,
    JobStore,
    timestamp,
)

log = logging.getLogger("merge_service.worker")
MAX_ATTEMPTS = 3  # a job whose worker died this many times is failed, not retried forever
NOT_TERMINAL = frozenset({"queued"}) | ACTIVE


@cache
def context() -> tuple[Settings, JobStore]:
    """Settings and store of this (child) process, made on first use, after the fork."""
    settings = Settings()
    return settings, JobStore.from_url(settings.redis_url_or_default)


class LockHeartbeat(threading.Thread):
    """Refresh the job's lock while the job runs; note if it was lost to another worker."""

    def __init__(self, store: JobStore, job_id: str, owner: str, interval: float) -> None:
        super().__init__(name=f"lock-{job_id}", daemon=True)
        self.store, self.job_id, self.owner, self.interval = store, job_id, owner, interval
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                if not self.store.refresh_lock(self.job_id, self.owner, 3 * self.interval):
                    log.error("job %s: lock lost (this worker stalled); stopping", self.job_id)
                    self.lost = True
                    return
            except Exception:  # Redis briefly away: try again at the next beat
                log.warning("job %s: cannot refresh the lock", self.job_id, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()


class ProgressReporter:
    """The engine's progress callback: status changes (validating -> running -> pushing) and
    one pipeline per update (record + event)."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.status = "validating"
        self.last: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        self.last = progress
        wanted = {"merging": "running", "finalizing": "running", "pushing": "pushing"}
        status = wanted.get(progress.stage, self.status)
        if status != self.status:
            self.store.transition(self.job_id, status, {self.status})
            self.status = status
        self.store.set_progress(self.job_id, JobProgress(
            stage=progress.stage, done=progress.done, total=progress.total,
            current=progress.current))


def run_job(job_id: str, *, worker: str) -> str:
    """Run job `job_id` if no one else is; returns what happened, for the worker log."""
    settings, store = context()
    owner = f"{worker}:{os.getpid()}"
    interval = settings.heartbeat_seconds
    if not store.acquire_lock(job_id, owner, 3 * interval):
        log.info("job %s is held by %s; this delivery is dropped", job_id,
                 store.lock_owner(job_id))
        return "held elsewhere"
    heartbeat = LockHeartbeat(store, job_id, owner, interval)
    heartbeat.start()
    try:
        record = store.get(job_id)
        if record is None or record.status in TERMINAL:
            return "unknown job" if record is None else f"already {record.status}"
        if store.cancel_requested(job_id):
            store.transition(job_id, "cancelled", NOT_TERMINAL, finished_at=timestamp())
            return "cancelled before it started"
        attempt = store.add_attempt(job_id)
        if attempt > MAX_ATTEMPTS:
            fail(store, job_id, JobError(
                type="WorkerLost", message=f"the job was interrupted {MAX_ATTEMPTS} times "
                "(its worker died each time); not retried again",
                details={"attempts": attempt - 1}))
            return "failed: too many attempts"
        store.transition(job_id, "validating", NOT_TERMINAL, started_at=timestamp(),
                         worker=worker, finished_at=None, result=None, error=None,
                         progress=JobProgress(stage="resolving").model_dump(mode="json"))
        if attempt > 1:
            remove_partial_outputs(record)
        return merge(store, record, settings, heartbeat, rerun=attempt > 1)
    finally:
        heartbeat.stop()
        store.release_lock(job_id, owner)


def merge(store: JobStore, record: JobRecord, settings: Settings, heartbeat: LockHeartbeat,
          *, rerun: bool) -> str:
    job_id = record.id
    reporter = ProgressReporter(store, job_id)

    def should_cancel() -> bool:
        return heartbeat.lost or store.cancel_requested(job_id)

    try:
        # a rerun may replace the output of its own interrupted attempt, which could have
        # been moved into place just before the worker died
        result = run_merge(record.spec, overwrite=rerun, hub=settings.hub, progress=reporter,
                           should_cancel=should_cancel)
    except MergeCancelled as exc:
        if heartbeat.lost:
            return "lock lost; left to the worker that holds it"
        store.transition(job_id, "cancelled", ACTIVE, finished_at=timestamp())
        return f"cancelled: {exc}"
    except InvalidInputError as exc:
        fail(store, job_id, JobError(type=type(exc).__name__, message=str(exc),
                                     details={"problems": [p.to_dict() for p in exc.problems]}))
        return f"failed: {type(exc).__name__}"
    except Exception as exc:
        if type(exc).__name__ == "SoftTimeLimitExceeded":
            fail(store, job_id, JobError(
                type="TimeLimitExceeded", message=f"the job ran longer than "
                f"MERGE_SERVICE_MAX_JOB_SECONDS ({settings.max_job_seconds} s)"))
            return "failed: time limit"
        log.exception("job %s failed", job_id)  # the full traceback: in the worker log only
        last = reporter.last
        details = {"stage": last.stage, "tensor": last.current} if last else None
        if not isinstance(exc, MergeServiceError):
            details = {**(details or {}), "unexpected": True}
        message = str(exc).strip() or type(exc).__name__
        fail(store, job_id, JobError(type=type(exc).__name__, message=message, details=details))
        return f"failed: {type(exc).__name__}"
    store.set_report(job_id, result.report)
    destination = record.spec.output.destination or str(result.destination)
    if not destination.startswith("hub://"):
        destination = str(result.destination)
    store.transition(job_id, "succeeded", ACTIVE, finished_at=timestamp(),
                     result=JobResult(destination=destination, url=result.url,
                                      files=result.files, revision=result.revision
                                      ).model_dump(mode="json"))
    return "succeeded"


def fail(store: JobStore, job_id: str, error: JobError) -> None:
    store.transition(job_id, "failed", NOT_TERMINAL, finished_at=timestamp(),
                     error=error.model_dump(mode="json"))


def remove_partial_outputs(record: JobRecord) -> None:
    """Temporary siblings an interrupted attempt left beside a local destination."""
    destination = record.spec.output.destination
    if not destination or destination.startswith("hub://"):
        return
    path = Path(destination)
    if not path.parent.is_dir():
        return
    for leftover in path.parent.glob(f".{path.name}.partial-*"):
        log.info("job %s: removing %s left by an interrupted attempt", record.id, leftover)
        shutil.rmtree(leftover, ignore_errors=True)
