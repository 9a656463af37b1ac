"""Schedules and their runs in Redis, and each schedule's Celery beat entry (celery-redbeat).

Keys (prefix `ms:`, the job store's):

- `schedule:{id}`: a hash: `record` (the schedule as JSON), `created_by` (the key's
  fingerprint, never returned); `schedules`: the ids, sorted (ids start with the creation time).
- `schedule:{id}:runs`: the run records, newest first, the last `RUNS_KEPT`.
- `schedule:{id}:open`: jobs submitted by the schedule (or retried from one of its jobs) that
  had not ended when last looked at (job id -> run id, fingerprint, base, merged adapters);
  `schedule:{id}:last_success`: the same, and the job, of the latest run whose job
  succeeded; `schedule:{id}:retried`: each retry of a schedule's job -> the run it repeats.
- `schedule:{id}:tick`: held while a tick of the schedule runs (`TICK_LOCK_S`, renewed every
  `TICK_RENEW_S` while the tick runs: a scheduler killed mid-tick holds it a minute at most);
  `schedule:{id}:fired:{slot}`: claimed by the scheduler that fires a tick (a second scheduler
  that fires the same one, in a lock hand-over, finds it claimed).
- `redbeat:{id}`, `redbeat::schedule`, `redbeat::lock`: celery-redbeat's entry of each active
  (not paused) schedule, its due times, and the lock that lets one scheduler fire at a time.

Everything a tick writes (its run, its open job, the last success) is written only while
`schedule:{id}` exists, in one Redis script, so that a tick that overlaps a delete leaves no key
behind; `delete` removes every key above.
"""

from __future__ import annotations

import builtins
import json
import logging
import secrets
import threading
from datetime import timedelta
from types import TracebackType
from typing import Any

from celery import Celery
from redis.exceptions import WatchError

from merge_service.settings import Settings
from workers.celery_app import make_celery
from workers.jobs import JobStore, new_job_id, now
from workers.schedules.models import (
    SCHEDULE_ID,
    PinnedAdapter,
    Schedule,
    ScheduleCreate,
    ScheduleRun,
    cron_schedule,
)

TICK_TASK = "merge_service.schedule_tick"  # the name of beat entries (run by the scheduler)
RUNS_KEPT = 500
TICK_LOCK_S = 60  # renewed while the tick runs; what a scheduler killed mid-tick leaves
TICK_RENEW_S = TICK_LOCK_S / 3
BEAT_MAX_INTERVAL_S = 1.0  # the scheduler looks at Redis this often: seconds-level schedules
BEAT_LOCK_TIMEOUT_S = 15  # a scheduler that stopped is replaced after this long
SLOT_CLAIM_S = 20 * BEAT_LOCK_TIMEOUT_S
PARTS = ("", "runs", "open", "last_success", "retried", "tick")  # a schedule's keys
log = logging.getLogger("merge_service.scheduler")

# KEYS[1] the schedule's record; the rest of KEYS and ARGV as each script says
_IF_SCHEDULE = "if redis.call('exists', KEYS[1]) == 0 then return 0 end "
_ADD_RUN = _IF_SCHEDULE + ("redis.call('lpush', KEYS[2], ARGV[1]) "
                           "redis.call('ltrim', KEYS[2], 0, tonumber(ARGV[2]) - 1) return 1")
_SET_FIELD = _IF_SCHEDULE + "redis.call('hset', KEYS[2], ARGV[1], ARGV[2]) return 1"
_SET = _IF_SCHEDULE + "redis.call('set', KEYS[2], ARGV[1]) return 1"
_ADD_RETRY = _IF_SCHEDULE + ("redis.call('hset', KEYS[2], ARGV[1], ARGV[2]) "
                             "redis.call('hset', KEYS[3], ARGV[1], ARGV[2]) return 1")


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


def schedule_key(jobs: JobStore, schedule_id: str, part: str = "") -> str:
    return f"{jobs.p}schedule:{schedule_id}{':' + part if part else ''}"


def register_retry(jobs: JobStore, schedule_id: str, original_job_id: str, retry_job_id: str
                   ) -> bool:
    """A retry of a schedule's job is one of the schedule's open jobs, for the run its original
    came from (that run's fingerprint): a tick waits for it, and its success is the run's.
    False when the schedule is gone or the original's run is not known (any more)."""
    key = schedule_key(jobs, schedule_id, "")
    origin = _job_origin(jobs, schedule_id, original_job_id)
    if origin is None or not jobs.r.exists(key):
        return False
    return bool(jobs.r.eval(_ADD_RETRY, 3, key, schedule_key(jobs, schedule_id, "open"),
                            schedule_key(jobs, schedule_id, "retried"), retry_job_id,
                            json.dumps(origin)))


def _job_origin(jobs: JobStore, schedule_id: str, job_id: str) -> dict[str, Any] | None:
    """The run a job of the schedule was submitted for: `run_id`, `fingerprint`, `base` and
    the adapters it `merged`."""
    for part in ("open", "retried"):
        raw = jobs.r.hget(schedule_key(jobs, schedule_id, part), job_id)
        if raw:
            return json.loads(raw)
    for raw in jobs.r.lrange(schedule_key(jobs, schedule_id, "runs"), 0, -1):
        run = ScheduleRun.model_validate_json(raw)
        if run.job_id == job_id and run.fingerprint:
            return {"run_id": run.id, "fingerprint": run.fingerprint, "base": run.base,
                    "merged": [[a.origin, a.revision] for a in run.adapters
                               if a.name in run.merged]}
    return None


class TickLock:
    """`schedule:{id}:tick`, held by one tick: it expires after `ttl_s` unless renewed, and a
    thread renews it every `renew_s` until the tick ends (a scheduler killed mid-tick leaves it
    for `ttl_s` at most, not for the longest tick there could be)."""

    def __init__(self, store: ScheduleStore, schedule_id: str, token: str, ttl_s: float,
                 renew_s: float) -> None:
        self.store, self.schedule_id, self.token = store, schedule_id, token
        self.ttl_s, self.renew_s = ttl_s, renew_s
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name=f"tick-lock-{schedule_id}")

    def __enter__(self) -> TickLock:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._ended.set()
        self._thread.join()
        self.store.release_tick(self.schedule_id, self.token)

    def _renew(self) -> None:
        while not self._ended.wait(self.renew_s):
            try:
                if not self.store.renew_tick(self.schedule_id, self.token, self.ttl_s):
                    log.warning("schedule %s: the tick lock was lost (expired or deleted)",
                                self.schedule_id)
                    return
            except Exception:  # Redis away: the tick itself fails on it; try again
                log.warning("schedule %s: cannot renew the tick lock", self.schedule_id,
                            exc_info=True)


class ScheduleStore:
    def __init__(self, jobs: JobStore, beat_app: Celery) -> None:
        self.jobs, self.r, self.p = jobs, jobs.r, jobs.p
        self.beat_app = beat_app
        self._release = self.r.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end")
        self._renew = self.r.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
        self._add_run = self.r.register_script(_ADD_RUN)
        self._set_field = self.r.register_script(_SET_FIELD)
        self._set = self.r.register_script(_SET)

    @classmethod
    def from_settings(cls, settings: Settings, jobs: JobStore | None = None) -> ScheduleStore:
        return cls(jobs or JobStore.from_url(settings.redis_url_or_default),
                   make_beat_app(settings))

    def _key(self, schedule_id: str, part: str = "") -> str:
        return schedule_key(self.jobs, schedule_id, part)

    def exists(self, schedule_id: str) -> bool:
        return bool(SCHEDULE_ID.match(schedule_id)) and bool(self.r.exists(self._key(schedule_id)))

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

    def list(self) -> builtins.list[Schedule]:
        ids = self.r.zrevrangebylex(f"{self.p}schedules", "+", "-")
        return [s for s in (self.get(i) for i in ids) if s is not None]

    def set_paused(self, schedule_id: str, paused: bool) -> Schedule | None:
        """The record written if it still exists (WATCH: not over a delete or another change),
        then the beat entry made to agree with the record as it is now, again until it did not
        change meanwhile: whatever pauses and resumes overlap, the last record written wins and
        the entry exists iff it is not paused."""
        if not SCHEDULE_ID.match(schedule_id):
            return None
        key = self._key(schedule_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, "record")
                    if raw is None:
                        return None
                    schedule = Schedule.model_validate_json(raw).model_copy(
                        update={"paused": paused})
                    pipe.multi()
                    pipe.hset(key, "record", schedule.model_dump_json(exclude={"last_run"}))
                    pipe.execute()
                    break
                except WatchError:
                    continue
        self.reconcile_entry(schedule_id)
        return self.get(schedule_id)

    def reconcile_entry(self, schedule_id: str) -> None:
        """The beat entry exists iff the schedule exists and is not paused, as the record reads
        after the entry was written."""
        acted_on: str | None = "unread"
        while True:
            raw = self.r.hget(self._key(schedule_id), "record")
            if raw == acted_on:
                return
            schedule = Schedule.model_validate_json(raw) if raw is not None else None
            if schedule is None or schedule.paused:
                self.remove_entry(schedule_id)
            elif not self.entry_exists(schedule_id):
                # resume: the first run one period from now. An entry that exists is left as it
                # is: saved again, its next run would move a period on at each resume of a
                # schedule that was not paused
                self._save_entry(schedule)
            acted_on = raw

    def delete(self, schedule_id: str) -> bool:
        if not SCHEDULE_ID.match(schedule_id):
            return False
        self.remove_entry(schedule_id)
        pipe = self.r.pipeline()
        pipe.zrem(f"{self.p}schedules", schedule_id)
        for part in PARTS:
            pipe.delete(self._key(schedule_id, part))
        removed = pipe.execute()
        # a set_paused that overlapped may have saved the entry after it was removed above
        self.reconcile_entry(schedule_id)
        for key in self.r.scan_iter(match=self._key(schedule_id, "fired:*"), count=1000):
            self.r.delete(key)
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

    def add_run(self, run: ScheduleRun) -> ScheduleRun | None:
        """Recorded, or None when the schedule is gone."""
        added = self._add_run(keys=[self._key(run.schedule_id), self._key(run.schedule_id,
                                                                          "runs")],
                              args=[run.model_dump_json(exclude={"job_status"}), RUNS_KEPT])
        return run if added else None

    def runs(self, schedule_id: str, limit: int = 50) -> builtins.list[ScheduleRun]:
        """Newest first, each with its job's current status."""
        raw = self.r.lrange(self._key(schedule_id, "runs"), 0, limit - 1)
        runs = [ScheduleRun.model_validate_json(r) for r in raw]
        pipe = self.r.pipeline(transaction=False)
        with_jobs = [(run, run.job_id) for run in runs if run.job_id]
        for _, job_id in with_jobs:
            pipe.hget(self.jobs.job_key(job_id), "status")
        for (run, _), status in zip(with_jobs, pipe.execute() if with_jobs else [],
                                    strict=True):
            run.job_status = json.loads(status) if status else None
        return runs

    # what ticks need

    def acquire_tick(self, schedule_id: str, ttl_s: float = TICK_LOCK_S) -> str | None:
        token = secrets.token_hex(8)
        return token if self.r.set(self._key(schedule_id, "tick"), token, nx=True,
                                   px=int(ttl_s * 1000)) else None

    def hold_tick(self, schedule_id: str, ttl_s: float = TICK_LOCK_S,
                  renew_s: float = TICK_RENEW_S) -> TickLock | None:
        """The tick lock, renewed while held (`with`), or None when another tick holds it."""
        token = self.acquire_tick(schedule_id, ttl_s)
        return None if token is None else TickLock(self, schedule_id, token, ttl_s, renew_s)

    def renew_tick(self, schedule_id: str, token: str, ttl_s: float = TICK_LOCK_S) -> bool:
        return bool(self._renew(keys=[self._key(schedule_id, "tick")],
                                args=[token, int(ttl_s * 1000)]))

    def release_tick(self, schedule_id: str, token: str) -> None:
        self._release(keys=[self._key(schedule_id, "tick")], args=[token])

    def claim_slot(self, schedule_id: str, slot: str) -> bool:
        """True for the first scheduler that fires the tick identified by `slot`."""
        # two schedulers can only see the same slot within a lock hand-over (both load the
        # entries afresh every second): a short expiry, not a key per tick kept for days
        return bool(self.r.set(self._key(schedule_id, f"fired:{slot}"), "1", nx=True,
                               ex=SLOT_CLAIM_S))

    def add_open(self, schedule_id: str, job_id: str, run_id: str, fingerprint: str, *,
                 base: str | None = None,
                 merged: builtins.list[PinnedAdapter] | None = None) -> bool:
        """False when the schedule is gone. `base` and `merged` (the adapters the job merges)
        tell a later tick whether only unreadable adapters changed."""
        entry: dict[str, Any] = {"run_id": run_id, "fingerprint": fingerprint}
        if merged is not None:
            entry |= {"base": base, "merged": [[a.origin, a.revision] for a in merged]}
        return bool(self._set_field(
            keys=[self._key(schedule_id), self._key(schedule_id, "open")],
            args=[job_id, json.dumps(entry)]))

    def settle(self, schedule_id: str
               ) -> tuple[dict[str, Any] | None, builtins.list[dict[str, Any]]]:
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
                self._set(keys=[self._key(schedule_id), success_key],
                          args=[json.dumps(last_success)])
            if status is None or status in {"succeeded", "failed", "cancelled"}:
                self.r.hdel(open_key, job_id)
            else:
                still_open.append({**entries[job_id], "job_id": job_id, "status": status})
        return last_success, still_open
