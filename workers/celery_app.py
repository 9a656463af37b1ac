"""The Celery application: Redis broker, one task per job, queues `gpu` and `cpu`.

`celery -A workers.celery_app worker` and `merge-service worker` both use `app` below, built
from the `MERGE_SERVICE_*` settings. The API builds its own instance with `make_celery` to
send tasks (it never imports the task code).
"""

from __future__ import annotations

import json
import os
from itertools import chain

import redis
from celery import Celery
from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool
from celery.signals import worker_process_init
from kombu import Queue

from merge_service.settings import Settings

QUEUES = ("gpu", "cpu")
RUN_JOB = "merge_service.run_job"
LOW_PRIORITY_NICENESS = 10


class _OneJobAsynPool(AsynPool):
    @property
    def timers(self) -> dict:
        return {self.maintain_pool: 0.2}


class JobPool(TaskPool):
    """Prefork, one job per child. A child exits after its job; billiard notices an exited
    child on a timer (5 s by default), which would delay the next job by up to 5 s."""

    Pool = _OneJobAsynPool


def task_ids_in_broker(r: redis.Redis) -> set[str]:
    """The ids of the tasks the Redis broker holds for our queues: waiting (at any priority
    level) or delivered and not yet acknowledged (kombu's `unacked` hash, where a late-acked
    job stays while it runs). Read from kombu's Redis layout: Celery has no call for it."""
    from kombu.transport.redis import Channel

    lists = [queue if priority == 0 else f"{queue}{Channel.sep}{priority}"
             for queue in QUEUES for priority in Channel.priority_steps]
    pipe = r.pipeline(transaction=False)
    for key in lists:
        pipe.lrange(key, 0, -1)
    pipe.hvals(Channel.unacked_key)
    *waiting, delivered = pipe.execute()
    messages = chain(chain.from_iterable(waiting),
                     (json.loads(raw)[0] for raw in delivered))  # [message, exchange, key]
    ids = set()
    for message in messages:
        if isinstance(message, bytes | str):
            message = json.loads(message)
        task_id = message.get("headers", {}).get("id")
        if task_id:
            ids.add(task_id)
    return ids


def make_celery(settings: Settings) -> Celery:
    app = Celery("merge_service", broker=settings.redis_url_or_default,
                 include=["workers.tasks"])
    limit = settings.max_job_seconds
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="cpu",
        task_serializer="json",
        accept_content=["json"],
        # job records hold results and state; Celery's own result store is not used
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # a job is acknowledged when it ends: a worker that dies leaves it to be run again
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # one job per child process: GPU memory, CUDA contexts and caches go with the child
        worker_max_tasks_per_child=1,
        worker_pool="workers.celery_app:JobPool",
        task_soft_time_limit=limit,
        task_time_limit=limit + 60,
        # an unacknowledged job is redelivered only after the longest job could have finished
        broker_transport_options={"visibility_timeout": limit + 600},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


@worker_process_init.connect
def _lower_job_priority(**_: object) -> None:
    """In each pool child (where jobs run), not in the worker's main process: merges are batch
    work, and on a shared host the API, Redis and the worker's heartbeats come first.

    `idle` is SCHED_IDLE where the OS has it: a waking normal task preempts the merge at once,
    where under a nice value it may wait out the merge's time slice (nice 19 elsewhere). The
    threads a merge starts later (PyTorch's pool) inherit the policy.
    """
    priority = Settings().job_cpu_priority
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif priority != "normal":
        os.nice(19 if priority == "idle" else LOW_PRIORITY_NICENESS)


app = make_celery(Settings())
