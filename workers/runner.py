"""One job, start to end, around the library's one entry point `run_merge`.

The job record is the source of truth. A worker first takes the job's lock (a Redis key with a
short expiry, refreshed by a heartbeat thread): a second delivery of the same job, while the
first runs, finds the lock taken and leaves the job alone. When a worker dies its lock expires
and a reaper (`workers.liveness`) puts the job back in the queue; the rerun starts from
scratch and overwrites nothing but its own earlier attempt (outputs are deterministic, writes
are atomic, so a killed attempt leaves no partial output at the destination).

A worker that stalled past its lock's expiry (swapping, a stopped process) may wake up while
another runs its job: every write of an attempt (state, progress, report) is made only while
its lock is still its own, ownership is checked again between layers, right before the output
is moved into place and before a Hub push, and an attempt that finds its lock gone stops and
writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from functools import cache
from pathlib import Path
from typing import Any

from merge_service.engine import Progress, run_merge
from merge_service.errors import InvalidInputError, MergeCancelled, MergeServiceError
from merge_service.settings import Settings
from merge_service.sinks.local import remove_partials_of
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
# the job's status during each stage of the engine: resolving and preflight are `validating`,
# every other stage (merging, AdaRank's factorizing and optimizing, finalizing) is `running`
VALIDATING_STAGES = frozenset({"resolving", "preflight"})


def status_of_stage(stage: str) -> str:
    if stage in VALIDATING_STAGES:
        return "validating"
    return "pushing" if stage == "pushing" else "running"


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

    def owned(self) -> bool:
        """Whether this attempt still holds the lock, asked of Redis now (the heartbeat
        notices a loss only at its next beat)."""
        if not self.lost and self.store.lock_owner(self.job_id) != self.owner:
            self.lost = True
        return not self.lost

    def should_cancel(self) -> bool:
        """The engine's check between layers, before the output is moved into place and
        before a push: stop on a cancel request or when the lock is no longer ours."""
        if self.lost:
            return True
        owned, cancel = self.store.owned_and_cancelled(self.job_id, self.owner)
        self.lost = not owned
        return self.lost or cancel


class ProgressReporter:
    """The engine's progress callback: status changes (validating -> running -> pushing) and
    one transaction per update (record + event), each made only while the lock is ours."""

    def __init__(self, store: JobStore, heartbeat: LockHeartbeat) -> None:
        self.store, self.job_id, self.heartbeat = store, heartbeat.job_id, heartbeat
        self.status = "validating"
        self.last: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        self.last = progress
        owner = self.heartbeat.owner
        status = status_of_stage(progress.stage)
        if status != self.status:
            if self.store.transition(self.job_id, status, {self.status}, owner=owner) is None:
                self.lost()
            self.status = status
        if not self.store.set_progress(self.job_id, JobProgress(
                stage=progress.stage, done=progress.done, total=progress.total,
                current=progress.current), owner=owner):
            self.lost()

    def lost(self) -> None:
        # the job is not ours to write any more (the lock went to another worker, which
        # requeued or reran it): stop the merge where it is
        self.heartbeat.lost = True
        raise MergeCancelled("this worker no longer holds the job's lock")


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
            store.transition(job_id, "cancelled", NOT_TERMINAL, owner=owner,
                             finished_at=timestamp())
            return "cancelled before it started"
        attempt = store.add_attempt(job_id)
        earlier = store.internal(job_id)["owner"]  # `worker:pid` of the previous attempt
        if attempt > MAX_ATTEMPTS:
            fail(store, job_id, JobError(
                type="WorkerLost", message=f"the job was interrupted {MAX_ATTEMPTS} times "
                "(its worker died each time); not retried again",
                details={"attempts": attempt - 1}), owner=owner)
            return "failed: too many attempts"
        if store.transition(job_id, "validating", NOT_TERMINAL, owner=owner,
                            started_at=timestamp(), worker=worker, finished_at=None,
                            result=None, error=None,
                            progress=JobProgress(stage="resolving").model_dump(mode="json")
                            ) is None:
            # cancelled (or finished) since it was read, or the lock is already lost
            return "not started: the job was cancelled or taken meanwhile"
        if store.cancel_requested(job_id):  # a cancel that came in between: run nothing
            store.transition(job_id, "cancelled", ACTIVE, owner=owner,
                             finished_at=timestamp())
            return "cancelled before it started"
        # a previous attempt that may still run has only stalled: its temporary directory
        # is left to it (it stops at its next check and removes it) until this attempt has
        # finished; a dead one's is removed now (a model's worth of disk)
        earlier_alive = attempt > 1 and attempt_may_run(earlier, worker, store, interval)
        if attempt > 1 and not earlier_alive:
            remove_attempt_outputs(record, earlier, worker)
        return merge(store, record, settings, heartbeat, rerun=attempt > 1,
                     earlier=earlier if earlier_alive else None)
    finally:
        heartbeat.stop()
        store.release_lock(job_id, owner)


def attempt_may_run(owner: str | None, worker: str, store: JobStore, interval: float) -> bool:
    """Whether the process of an attempt (`owner` = `worker:pid`) may still be running: a
    child of this very worker is looked up by its pid; another worker's children only by that
    worker's heartbeat."""
    if owner is None:
        return False
    name, _, pid = owner.rpartition(":")
    if name != worker:
        return any(w["name"] == name for w in store.live_workers(3 * interval))
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def merge(store: JobStore, record: JobRecord, settings: Settings, heartbeat: LockHeartbeat,
          *, rerun: bool, earlier: str | None = None) -> str:
    """Run the job's merge. `earlier`: the owner of a previous attempt that may still run
    (stalled): its temporary output is removed once this attempt has ended."""
    job_id, owner = record.id, heartbeat.owner
    reporter = ProgressReporter(store, heartbeat)
    lost = "lock lost; the job is left to whoever holds it"
    worker = owner.rpartition(":")[0]
    try:
        # a rerun may replace the output of its own interrupted attempt, which could have
        # been moved into place just before the worker died; never another job's
        try:
            hub = settings.hub_for(store.internal(job_id)["hub_secret"])
            result = run_merge(record.spec, overwrite=rerun and written_by(record), hub=hub,
                               progress=reporter, should_cancel=heartbeat.should_cancel,
                               job_id=job_id)
        finally:
            if earlier is not None and heartbeat.owned():  # before the job is seen to end
                remove_attempt_outputs(record, earlier, worker)
    except MergeCancelled as exc:
        if not heartbeat.owned():
            return lost
        store.transition(job_id, "cancelled", ACTIVE, owner=owner, finished_at=timestamp())
        return f"cancelled: {exc}"
    except InvalidInputError as exc:
        if not heartbeat.owned():
            return lost
        fail(store, job_id, JobError(type=type(exc).__name__, message=str(exc),
                                     details={"problems": [p.to_dict() for p in exc.problems]}),
             owner=owner)
        return f"failed: {type(exc).__name__}"
    except Exception as exc:
        # an attempt that lost its lock fails in odd ways (its temporary directory removed
        # under it by the rerun): none of that is the job's error
        if not heartbeat.owned():
            log.info("job %s: %s (%s)", job_id, lost, type(exc).__name__)
            return lost
        if time_limit_hit(exc):
            fail(store, job_id, JobError(
                type="TimeLimitExceeded", message=f"the job ran longer than "
                f"MERGE_SERVICE_MAX_JOB_SECONDS ({settings.max_job_seconds} s)"), owner=owner)
            return "failed: time limit"
        log.exception("job %s failed", job_id)  # the full traceback: in the worker log only
        last = reporter.last
        # what the job was at: a tensor while merging, the repo while pushing
        details: dict[str, Any] | None = \
            {"stage": last.stage, "current": last.current} if last else None
        if not isinstance(exc, MergeServiceError):
            details = {**(details or {}), "unexpected": True}
        message = str(exc).strip() or type(exc).__name__
        fail(store, job_id, JobError(type=type(exc).__name__, message=message, details=details),
             owner=owner)
        return f"failed: {type(exc).__name__}"
    if not store.set_report(job_id, result.report, owner=owner):
        return lost
    destination = record.spec.output.destination or str(result.destination)
    if not destination.startswith("hub://"):
        destination = str(result.destination)
    if store.transition(job_id, "succeeded", ACTIVE, owner=owner, finished_at=timestamp(),
                        result=JobResult(destination=destination, url=result.url,
                                         files=result.files, revision=result.revision
                                         ).model_dump(mode="json")) is None:
        return lost
    return "succeeded"


def time_limit_hit(exc: BaseException) -> bool:
    """Celery's soft time limit, raised as it is or as the cause of a failure it made (a Hub
    push that it interrupted is a HubPushError caused by it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "SoftTimeLimitExceeded":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fail(store: JobStore, job_id: str, error: JobError, owner: str | None = None) -> None:
    """Mark the job failed; with `owner`, only if that worker still holds its lock."""
    store.transition(job_id, "failed", NOT_TERMINAL, owner=owner, finished_at=timestamp(),
                     error=error.model_dump(mode="json"))


def written_by(record: JobRecord) -> bool:
    """Whether the job's local destination holds this very job's output (`job_id` in its
    merge_report.json): an attempt that committed it and died before recording success. Only
    that output may a rerun replace; another job's, written there meanwhile, stays."""
    destination = record.spec.output.destination
    if not destination or destination.startswith("hub://"):  # staged afresh for every run
        return False
    try:
        report = json.loads((Path(destination) / "merge_report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("job_id") == record.id


def remove_attempt_outputs(record: JobRecord, attempt: str | None, worker: str) -> None:
    """The temporary output an earlier attempt (`attempt` = its owner, `worker:pid`) left
    beside a local destination; other merges' temporaries there stay."""
    destination = record.spec.output.destination
    if attempt is None or not destination or destination.startswith("hub://"):
        return
    name, _, pid = attempt.rpartition(":")
    if pid.isdigit():
        remove_partials_of(Path(destination), int(pid), this_host=name == worker)
