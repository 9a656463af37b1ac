"""The one Celery task: run a job by id (everything else is in `workers.runner`)."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded

import workers.liveness  # also registers the heartbeat and reaper with the worker
from workers.celery_app import RUN_JOB, app
from workers.jobs import JobError
from workers.runner import context, fail, run_job


class JobTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: tuple, kwargs: dict,
                   einfo: Any) -> None:
        # Called in the worker's main process when the hard time limit killed the child,
        # which could not record anything itself.
        if isinstance(exc, TimeLimitExceeded) and args:
            settings, store = context()
            holder, here = store.lock_owner(args[0]), workers.liveness.worker_name()
            if holder is not None and here is not None and not holder.startswith(f"{here}:"):
                return  # the killed child had lost the job to another worker, which runs it
            fail(store, args[0], JobError(
                type="TimeLimitExceeded", message="the job was killed after "
                f"MERGE_SERVICE_MAX_JOB_SECONDS ({settings.max_job_seconds} s) and a grace "
                "period"))


@app.task(name=RUN_JOB, base=JobTask, bind=True)
def run(self: Task, job_id: str) -> str:
    return run_job(job_id, worker=self.request.hostname or "worker")
