"""The one Celery task: run a job by id (everything else is in `workers.runner`)."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.worker.request import Request

import workers.liveness  # also registers the heartbeat and reaper with the worker
from workers.celery_app import RUN_JOB, app
from workers.jobs import ACTIVE, JobError, timestamp
from workers.runner import context, run_job

# task id -> pid of the pool child the hard time limit is about to kill (main process only)
_timed_out: dict[str, int] = {}


class JobRequest(Request):
    def on_timeout(self, soft: bool, timeout: float) -> None:
        # billiard calls this before it kills the child: note which child ran the job, so that
        # `on_failure` tells its attempt from a rerun another child may have started meanwhile
        if not soft and self.worker_pid is not None:
            _timed_out[self.id] = self.worker_pid
        super().on_timeout(soft, timeout)


class JobTask(Task):
    Request = JobRequest

    def on_failure(self, exc: Exception, task_id: str, args: tuple, kwargs: dict,
                   einfo: Any) -> None:
        # Called in the worker's main process when the hard time limit kills the child, which
        # cannot record anything itself.
        pid = _timed_out.pop(task_id, None)
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        settings, store = context()
        killed = f"{workers.liveness.worker_name()}:{pid}"
        if store.lock_owner(args[0]) not in (None, killed):
            return  # the killed child had lost the job to another attempt, which runs it
        # only an attempt still under way is failed: a job the reaper already put back in the
        # queue is a rerun's to finish
        store.transition(args[0], "failed", ACTIVE, finished_at=timestamp(), error=JobError(
            type="TimeLimitExceeded", message="the job was killed after "
            f"MERGE_SERVICE_MAX_JOB_SECONDS ({settings.max_job_seconds} s) and a grace "
            "period").model_dump(mode="json"))


@app.task(name=RUN_JOB, base=JobTask, bind=True)
def run(self: Task, job_id: str) -> str:
    return run_job(job_id, worker=self.request.hostname or "worker")
