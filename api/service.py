"""What the routes do: one method per endpoint, on top of the job store and the Celery app.

Submitting runs the library's preflight (`merge_service.engine.prepare`) in the API process,
so that a bad spec is answered with every problem before anything is queued. The device check
is left to the worker (the API host may have no GPU; the job waits in the `gpu` queue).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from starlette.concurrency import run_in_threadpool

from api.auth import Principal
from api.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from api.metrics import ApiMetrics
from merge_service.engine import prepare
from merge_service.errors import InvalidInputError, Problem, SpecError
from merge_service.methods import catalog
from merge_service.preflight import local_paths, outside_roots_problems
from merge_service.settings import Settings
from merge_service.spec import JobSpec
from workers.celery_app import RUN_JOB
from workers.jobs import (
    ACTIVE,
    TERMINAL,
    IdempotencyClaim,
    IdempotencyConflict,
    IdempotencyInProgress,
    JobError,
    JobRecord,
    JobStore,
    timestamp,
)

log = logging.getLogger("merge_service.api")
IDEMPOTENCY_WAIT_S = 10.0  # a duplicate request waits this long for the first one's job


class JobService:
    def __init__(self, settings: Settings, store: JobStore, celery: Celery,
                 metrics: ApiMetrics) -> None:
        self.settings, self.store, self.celery, self.metrics = settings, store, celery, metrics
        self.worker_ttl = 3 * settings.heartbeat_seconds

    # jobs

    def submit(self, spec: JobSpec, principal: Principal, idempotency_key: str | None = None,
               schedule_id: str | None = None, hub_secret: str | None = None
               ) -> tuple[JobRecord, bool]:
        """Preflight, store, enqueue. Returns the job and whether it was an idempotent replay.
        `hub_secret`: a schedule's `hf_token_secret`, whose token the preflight and the job
        use instead of the configured one.

        An `Idempotency-Key` is looked up first: a replay gets the job the key created even
        once that job has written its destination (which preflight would now refuse). The key
        is claimed until this request ends; it ends pointing at a queued job, or free again."""
        claim = None
        if idempotency_key is not None:
            digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
            earlier = self.claim_idempotency(f"{principal.name}:{idempotency_key}", digest)
            if isinstance(earlier, JobRecord):
                return earlier, True
            claim = earlier
        record = None
        try:
            resolved = self.preflight(spec, hub_secret)
            queue = self.queue_for(spec.options.device)
            try:
                record = self.store.create(resolved, queue=queue, submitted_by=principal.name,
                                           schedule_id=schedule_id, hub_secret=hub_secret,
                                           idempotency=claim)
            except IdempotencyInProgress:
                raise Conflict("the claim on this Idempotency-Key expired while the request "
                               "ran; submit again", type="IdempotencyInProgress") from None
            try:
                self.celery.send_task(RUN_JOB, args=[record.id], task_id=record.id,
                                      queue=queue)
            except Exception as exc:
                log.exception("job %s: cannot enqueue", record.id)
                failed = self.store.transition(record.id, "failed", {"queued"},
                                               finished_at=timestamp(),
                                               error=JobError(type="EnqueueError",
                                                              message="the broker refused the "
                                                              "job").model_dump())
                if failed is not None:
                    raise Unavailable("the job could not be queued: the broker is "
                                      "unavailable") from exc
                # the send went through after all: a worker has taken the job
                log.warning("job %s: the send raised, yet a worker has the job", record.id)
        except BaseException:
            if claim is not None:  # no queued job came of it: the key may be used again
                self.store.release_idempotency(claim, record.id if record else None)
            raise
        self.metrics.submitted.labels(queue).inc()
        return record, False

    def claim_idempotency(self, key: str, digest: str) -> IdempotencyClaim | JobRecord:
        """The job an earlier request with this key created, or the key claimed for a new
        one. A request with the same key and body still running is waited for a while."""
        deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
        while True:
            try:
                return self.store.claim_idempotency(key, digest)
            except IdempotencyConflict as exc:
                raise Conflict(str(exc), type="IdempotencyConflict") from None
            except IdempotencyInProgress as exc:
                if time.monotonic() > deadline:
                    raise Conflict(f"{exc}; try again later",
                                   type="IdempotencyInProgress") from None
            time.sleep(0.05)

    def preflight(self, spec: JobSpec, hub_secret: str | None = None) -> JobSpec:
        """Every problem of the spec, or the spec to store: sources pinned, local paths
        absolute, the user's device kept as written."""
        roots = self.settings.local_root_paths
        if roots:  # before any file is opened
            outside = outside_roots_problems(local_paths(spec), roots)
            if outside:
                raise Invalid(f"the spec has {len(outside)} problem(s)", outside,
                              type="PreflightError")
        as_cpu = spec.model_copy(update={"options": spec.options.model_copy(
            update={"device": "cpu"})})
        try:
            # Hub weights stay on the Hub until a worker runs the job: headers suffice here
            prepared = prepare(as_cpu, hub=self.settings.hub_for(hub_secret), weights=False)
        except InvalidInputError as exc:
            raise Invalid(f"the spec has {len(exc.problems)} problem(s)", exc.problems,
                          type=type(exc).__name__) from None
        try:
            output = spec.output
            if output.destination and not output.destination.startswith("hub://"):
                output = output.model_copy(update={"destination": str(prepared.destination)})
            return prepared.resolved_spec.model_copy(update={"options": spec.options,
                                                             "output": output})
        finally:
            prepared.close()

    def every_problem(self, error: SpecError) -> list[Problem]:
        """The problems of a spec that does not match the schema, and, when it is valid less
        its unknown fields and invalid values, what preflight finds in the rest (a typo must
        not hide the other problems until it is fixed)."""
        if error.partial is None:
            return error.problems
        try:
            self.preflight(error.partial)
        except Invalid as exc:
            return error.with_problems_of_partial(exc.problems).problems
        return error.problems

    def queue_for(self, device: str) -> str:
        """cuda* -> gpu; cpu -> cpu; auto -> gpu if a live worker consumes it, else cpu."""
        if device.startswith("cuda"):
            return "gpu"
        if device == "cpu":
            return "cpu"
        live = self.store.live_workers(self.worker_ttl)
        return "gpu" if any("gpu" in w["queues"] for w in live) else "cpu"

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r}")
        return record

    async def get_json(self, client: aioredis.Redis, job_id: str) -> str:
        """`get`, as JSON text straight from the stored fields (the polling hot path)."""
        text = await self.store.get_json(client, job_id)
        if text is None:
            raise NotFound(f"no job {job_id!r}")
        return text

    async def list_json(self, client: aioredis.Redis, status: str | None, name: str | None,
                        limit: int, cursor: str | None) -> str:
        """A `JobList` as JSON text; unfiltered pages come straight from the stored fields."""
        if status is None and name is None:
            records, next_cursor = await self.store.list_json(client, limit=limit, after=cursor)
        else:
            jobs, next_cursor = await run_in_threadpool(
                self.store.list, status=status, name=name, limit=limit, after=cursor)
            records = [job.model_dump_json() for job in jobs]
        return f'{{"jobs":[{",".join(records)}],"next_cursor":{json.dumps(next_cursor)}}}'

    def cancel(self, job_id: str, principal: Principal) -> JobRecord:
        record = self.get(job_id)
        self._check_owner(job_id, principal)
        if record.status in TERMINAL:
            raise Conflict(f"job {job_id} has already {record.status}")
        if record.status == "pushing" and self.store.lock_owner(job_id) is not None:
            # past the engine's last check: a cancel would be recorded while the commit lands
            raise Conflict(f"job {job_id} is pushing its output to the Hub as one commit, "
                           "which cannot be stopped part way; it ends on its own")
        self.store.request_cancel(job_id)
        # no worker holds it (still queued, or its worker died and the requeue would wait
        # for a live one): cancelled now; a worker that gets it later skips it. One that
        # holds it stops at its next check.
        self.store.transition(job_id, "cancelled", {"queued", *ACTIVE}, unlocked=True,
                              finished_at=timestamp())
        return self.get(job_id)

    def retry(self, job_id: str, principal: Principal) -> JobRecord:
        record = self.get(job_id)
        if record.status not in TERMINAL:
            raise Conflict(f"job {job_id} is {record.status}; only a finished job can be retried")
        destination = record.spec.output.destination
        if record.status == "succeeded" and destination and not destination.startswith("hub://"):
            # a Hub destination takes another commit; a local output is never replaced by a job
            raise Conflict(f"job {job_id} succeeded and its output is at {destination}: a "
                           "retry would write there again; submit its spec with another "
                           "destination")
        new, _ = self.submit(record.spec, principal, schedule_id=record.schedule_id,
                             hub_secret=self.store.internal(job_id)["hub_secret"])
        if record.schedule_id is not None:
            from workers.schedules.store import register_retry

            # one of the schedule's open jobs, for the original's run: ticks wait for it, and
            # its success is recorded as that run's
            register_retry(self.store, record.schedule_id, job_id, new.id)
        return new

    def report(self, job_id: str) -> dict[str, Any]:
        record = self.get(job_id)
        if record.status != "succeeded":
            raise Conflict(f"job {job_id} is {record.status}; a report exists once it succeeded")
        report = self.store.get_report(job_id)
        if report is None:
            raise NotFound(f"job {job_id} has no report")
        return report

    def _check_owner(self, job_id: str, principal: Principal) -> None:
        if principal.role == "admin":
            return
        if self.store.internal(job_id)["submitted_by"] != principal.name:
            raise Forbidden(f"only the key that submitted job {job_id}, or an admin key, may "
                            "cancel it")

    # the rest

    @staticmethod
    def methods() -> list[dict[str, Any]]:
        return catalog()

    def readiness(self) -> dict[str, Any]:
        problems = []
        try:
            self.store.r.ping()
            redis_ok = True
            workers = self.store.live_workers(self.worker_ttl)
        except Exception as exc:
            redis_ok, workers = False, []
            problems.append(f"Redis unreachable: {type(exc).__name__}")
        if redis_ok and not workers:
            problems.append("no live worker")
        return {"ready": not problems, "redis": redis_ok, "live_workers": len(workers),
                "workers": workers, "problems": problems}
