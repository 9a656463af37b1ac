"""Schedules and their runs in Redis, and each schedule's Celery beat entry (celery-redbeat).

Keys (prefix `ms:`, the job store's):

- `schedule:{id}`: a hash: `record` (the schedule as JSON), `created_by` (the key's
  fingerprint, never returned); `schedules`: the ids, sorted (ids start with the creation time).
- `schedule:{id}:runs`: the run records, newest first, the last `RUNS_KEPT`.
- `schedule:{id}:open`: jobs submitted by the schedule that had not ended when last looked at
  (job id -> run id and fingerprint); `schedule:{id}:last_success`: the fingerprint, run and
  job of the latest run whose job succeeded.
- `schedule:{id}:tick`: held while a tick of the schedule runs; `schedule:{id}:fired:{slot}`:
  claimed by the scheduler that fires a tick (a second scheduler that fires the same one, in a
  lock hand-over, finds it claimed).
- `redbeat:{id}`, `redbeat::schedule`, `redbeat::lock`: celery-redbeat's entry of each active
  (not paused) schedule, its due times, and the lock that lets one scheduler fire at a time.
"""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from typing import Any

from celery import Celery

from merge_service.settings import Settings
from workers.celery_app import make_celery
from workers.jobs import JobStore, new_job_id, now
from workers.schedules.models import (
    SCHEDULE_ID,
    Schedule,
    ScheduleCreate,
    ScheduleRun,
    cron_schedule,
)

TICK_TASK = "merge_service.schedule_tick"  # the name of beat entries (run by the scheduler)
RUNS_KEPT = 500
TICK_LOCK_S = 3600  # a tick resolves a collection and preflights a job: minutes at most
BEAT_MAX_INTERVAL_S = 1.0  # the scheduler looks at Redis this often: seconds-level schedules
BEAT_LOCK_TIMEOUT_S = 15  # a scheduler that stopped is replaced after this long
SLOT_CLAIM_S = 20 * BEAT_LOCK_TIMEOUT_S


def make_beat_app(settings: Settings, redis_retry_s: float | None = None) -> Celery:
    """The Celery app with celery-redbeat configured on the service's Redis.

    `redis_retry_s`: how long redbeat retries a Redis that went away before giving up (the
    scheduler rides out a Redis restart; the API answers at once instead)."""
    app = make_celery(settings)
    url = settings.redis_url_or_default
    prefix = "ms:redbeat:"
    options: dict[str, Any] = {"health_check_interval": 30}
    if redis_retry_s is not None:
        options["retry_period"] = redis_retry_s
    app.conf.update(
        beat_scheduler="workers.schedules.beat:ScheduleBeat",
        beat_max_loop_interval=BEAT_MAX_INTERVAL_S,
        redbeat_redis_url=url,
        redbeat_redis_options=options,
        redbeat_key_prefix=prefix,
        redbeat_lock_key=f"{prefix}:lock",
        redbeat_lock_timeout=BEAT_LOCK_TIMEOUT_S,
        result_expires=None,  # no result backend: no `celery.backend_cleanup` entry
        beat_enable_remote_control=False,
    )
    from redbeat.schedulers import ensure_conf

    ensure_conf(app)  # app.redbeat_conf, which entries read
    return app


def beat_schedule(schedule: ScheduleCreate) -> Any:
    from celery.schedules import schedule as interval

    if schedule.every_seconds is not None:
        return interval(run_every=timedelta(seconds=schedule.every_seconds))
    assert schedule.cron is not None
    return cron_schedule(schedule.cron)


class ScheduleStore:
    def __init__(self, jobs: JobStore, beat_app: Celery) -> None:
        self.jobs, self.r, self.p = jobs, jobs.r, jobs.p
        self.beat_app = beat_app
        self._release = self.r.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end")

    @classmethod
    def from_settings(cls, settings: Settings, jobs: JobStore | None = None) -> ScheduleStore:
        return cls(jobs or JobStore.from_url(settings.redis_url_or_default),
                   make_beat_app(settings))

    def _key(self, schedule_id: str, part: str = "") -> str:
        return f"{self.p}schedule:{schedule_id}{':' + part if part else ''}"

    # schedules

    def create(self, body: ScheduleCreate, created_by: str) -> Schedule:
        schedule = Schedule(**body.model_dump(), id=new_job_id(), created_at=now())
        pipe = self.r.pipeline()
        pipe.hset(self._key(schedule.id), mapping={
            "record": schedule.model_dump_json(exclude={"last_run"}),
            "created_by": json.dumps(created_by)})
        pipe.zadd(f"{self.p}schedules", {schedule.id: 0})
        pipe.execute()
        if not schedule.paused:
            self._save_entry(schedule)
        return schedule

    def get(self, schedule_id: str) -> Schedule | None:
        if not SCHEDULE_ID.match(schedule_id):
            return None
        raw = self.r.hget(self._key(schedule_id), "record")
        if raw is None:
            return None
        last = self.runs(schedule_id, limit=1)
        return Schedule.model_validate_json(raw).model_copy(
            update={"last_run": last[0] if last else None})

    def owner(self, schedule_id: str) -> str | None:
        raw = self.r.hget(self._key(schedule_id), "created_by")
        return json.loads(raw) if raw else None

    def list(self) -> list[Schedule]:
        ids = self.r.zrevrangebylex(f"{self.p}schedules", "+", "-")
        return [s for s in (self.get(i) for i in ids) if s is not None]

    def set_paused(self, schedule_id: str, paused: bool) -> Schedule | None:
        schedule = self.get(schedule_id)
        if schedule is None:
            return None
        schedule = schedule.model_copy(update={"paused": paused})
        self.r.hset(self._key(schedule_id), "record",
                    schedule.model_dump_json(exclude={"last_run"}))
        if paused:
            self.remove_entry(schedule_id)
        else:
            self._save_entry(schedule)
        return schedule

    def delete(self, schedule_id: str) -> bool:
        if not SCHEDULE_ID.match(schedule_id):
            return False
        self.remove_entry(schedule_id)
        pipe = self.r.pipeline()
        pipe.zrem(f"{self.p}schedules", schedule_id)
        for part in ("", "runs", "open", "last_success"):
            pipe.delete(self._key(schedule_id, part))
        removed = pipe.execute()
        return bool(removed[0])

    # beat entries

    def _save_entry(self, schedule: Schedule) -> None:
        from redbeat import RedBeatSchedulerEntry

        # last_run_at defaults to now: the first run is one period after creation (or resume)
        RedBeatSchedulerEntry(schedule.id, TICK_TASK, beat_schedule(schedule),
                              args=[schedule.id], app=self.beat_app).save()

    def remove_entry(self, schedule_id: str) -> None:
        from redbeat import RedBeatSchedulerEntry

        RedBeatSchedulerEntry(schedule_id, TICK_TASK, app=self.beat_app).delete()

    def entry_exists(self, schedule_id: str) -> bool:
        from redbeat import RedBeatSchedulerEntry

        key = RedBeatSchedulerEntry.generate_key(self.beat_app, schedule_id)
        return self.r.zscore(self.beat_app.redbeat_conf.schedule_key, key) is not None

    # runs

    def add_run(self, run: ScheduleRun) -> ScheduleRun:
        pipe = self.r.pipeline()
        pipe.lpush(self._key(run.schedule_id, "runs"), run.model_dump_json(exclude={"job_status"}))
        pipe.ltrim(self._key(run.schedule_id, "runs"), 0, RUNS_KEPT - 1)
        pipe.execute()
        return run

    def runs(self, schedule_id: str, limit: int = 50) -> list[ScheduleRun]:
        """Newest first, each with its job's current status."""
        raw = self.r.lrange(self._key(schedule_id, "runs"), 0, limit - 1)
        runs = [ScheduleRun.model_validate_json(r) for r in raw]
        pipe = self.r.pipeline(transaction=False)
        with_jobs = [run for run in runs if run.job_id]
        for run in with_jobs:
            pipe.hget(self.jobs.job_key(run.job_id), "status")  # type: ignore[arg-type]
        for run, status in zip(with_jobs, pipe.execute() if with_jobs else [], strict=True):
            run.job_status = json.loads(status) if status else None
        return runs

    # what ticks need

    def acquire_tick(self, schedule_id: str) -> str | None:
        token = secrets.token_hex(8)
        return token if self.r.set(self._key(schedule_id, "tick"), token, nx=True,
                                   ex=TICK_LOCK_S) else None

    def release_tick(self, schedule_id: str, token: str) -> None:
        self._release(keys=[self._key(schedule_id, "tick")], args=[token])

    def claim_slot(self, schedule_id: str, slot: str) -> bool:
        """True for the first scheduler that fires the tick identified by `slot`."""
        # two schedulers can only see the same slot within a lock hand-over (both load the
        # entries afresh every second): a short expiry, not a key per tick kept for days
        return bool(self.r.set(self._key(schedule_id, f"fired:{slot}"), "1", nx=True,
                               ex=SLOT_CLAIM_S))

    def add_open(self, schedule_id: str, job_id: str, run_id: str, fingerprint: str) -> None:
        self.r.hset(self._key(schedule_id, "open"), job_id,
                    json.dumps({"run_id": run_id, "fingerprint": fingerprint}))

    def settle(self, schedule_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """Look at the jobs not yet seen ending: record the newest success, forget the ended.
        Returns the last success and the jobs still open (`job_id`, `status`, `fingerprint`)."""
        open_key, success_key = self._key(schedule_id, "open"), self._key(schedule_id,
                                                                         "last_success")
        entries = {job_id: json.loads(v) for job_id, v in self.r.hgetall(open_key).items()}
        raw = self.r.get(success_key)
        last_success = json.loads(raw) if raw else None
        still_open = []
        for job_id in sorted(entries):  # ids sort by creation time
            raw = self.r.hget(self.jobs.job_key(job_id), "status")
            status = json.loads(raw) if raw else None
            if status == "succeeded" and (last_success is None
                                          or job_id > last_success["job_id"]):
                last_success = {**entries[job_id], "job_id": job_id}
                self.r.set(success_key, json.dumps(last_success))
            if status is None or status in {"succeeded", "failed", "cancelled"}:
                self.r.hdel(open_key, job_id)
            else:
                still_open.append({**entries[job_id], "job_id": job_id, "status": status})
        return last_success, still_open
