"""The scheduler process (`merge-service scheduler`): Celery beat with celery-redbeat.

Schedules live in Redis as redbeat entries (written by the API), so a schedule created, paused
or deleted through the API takes effect at the scheduler's next look at Redis (every second),
without a restart. redbeat's lock lets one scheduler fire at a time: a second one waits for the
lock and takes over when the first stops (at once on a clean stop, `BEAT_LOCK_TIMEOUT_S` after
a crash). Each tick also claims its slot in Redis, so that a tick is fired once even in a lock
hand-over.

A due entry is not sent to the job queue as a Celery task: the tick runs here, in a thread
(`Ticker.tick`: resolve the collection, then skip or submit a job). Merge workers run one
long job per child; a tick queued behind merges would fire hours late.
"""

from __future__ import annotations

import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, ClassVar

from celery.beat import Service
from redbeat import RedBeatScheduler, RedBeatSchedulerEntry
from redbeat.schedules import rrule
from redis.exceptions import LockError

from workers.schedules.models import rule_from
from workers.schedules.store import TICK_TASK, ScheduleStore, make_beat_app
from workers.schedules.ticks import Ticker

log = logging.getLogger("merge_service.scheduler")
TICK_THREADS = 4
REDIS_RETRY_S = 300.0  # Redis away for longer: the scheduler exits (and is restarted)


class TickEntry(RedBeatSchedulerEntry):
    """redbeat's entry, a 6-field cron's rule counted from the entry's last run (see
    `rule_from`): the rule stored in Redis counts from the schedule's creation or resume."""

    @classmethod
    def from_key(cls, key: str, app: Any = None) -> TickEntry:
        entry = super().from_key(key, app=app)
        if isinstance(entry.schedule, rrule) and entry.last_run_at is not None:
            entry.schedule = rule_from(entry.schedule, entry.last_run_at)
        return entry


class ScheduleBeat(RedBeatScheduler):
    """redbeat's scheduler, running each due tick in a thread of this process."""

    Entry = TickEntry
    ticker: ClassVar[Ticker | None] = None  # set by `run_scheduler`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.pool = ThreadPoolExecutor(TICK_THREADS, thread_name_prefix="tick")
        super().__init__(*args, **kwargs)

    @property
    def _maybe_due_kwargs(self) -> dict[str, Any]:  # no broker producer: nothing is sent
        return {}

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True,
                    **kwargs: Any) -> None:
        previous: datetime | None = entry.last_run_at
        entry = self.reserve(entry) if advance else entry
        if entry.task != TICK_TASK or not entry.args or self.ticker is None:
            log.warning("beat entry %s is not a schedule tick; ignored", entry.name)
            return
        schedule_id = entry.args[0]
        slot = previous.isoformat() if previous else "first"
        if not self.ticker.schedules.claim_slot(schedule_id, slot):
            log.warning("schedule %s: the tick after %s was fired already", schedule_id, slot)
            return
        self.pool.submit(self._tick, schedule_id)

    def _tick(self, schedule_id: str) -> None:
        assert self.ticker is not None
        try:
            self.ticker.tick(schedule_id)
        except Exception:
            log.exception("schedule %s: the tick failed", schedule_id)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            return super().tick(*args, **kwargs)
        except LockError:
            # this process stalled past the lock's timeout and another scheduler took over:
            # nothing was fired; wait to be the one again
            log.warning("the scheduler lock was lost; waiting for it")
            self.lock.acquire()
            log.info("the scheduler lock is held again")
            return 0.0

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        super().close()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def run_scheduler(log_level: str = "info") -> int:
    from api.metrics import ApiMetrics
    from api.service import JobService
    from merge_service.settings import Settings
    from workers.celery_app import make_celery
    from workers.jobs import JobStore

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    jobs = JobStore.from_url(settings.redis_url_or_default)
    app = make_beat_app(settings, redis_retry_s=REDIS_RETRY_S)
    schedules = ScheduleStore(jobs, app)
    service = JobService(settings, jobs, make_celery(settings),
                         ApiMetrics(jobs, 3 * settings.heartbeat_seconds))
    beat_cls = type("ScheduleBeat", (ScheduleBeat,),
                    {"ticker": Ticker(settings, schedules, service)})
    # SIGTERM: leave the loop, which releases the lock for the next scheduler at once
    signal.signal(signal.SIGTERM, _stop)
    log.info("scheduler: waiting for the scheduler lock (one scheduler fires at a time)")
    Service(app, scheduler_cls=beat_cls).start()
    return 0
