"""One tick of a schedule: resolve its collection and its base (a Hub base to its current
commit), skip when nothing changed since the last successful run, else submit a job pinned to
the resolved revisions.

While a job of the schedule has not ended (queued, validating, running, pushing; a retry of
one of its jobs included), a tick submits nothing and records a skip naming that job: the jobs
of a schedule push to one destination, and a second job that ended first would be overwritten
by the first, which the schedule would not know. A manual run with `force` submits anyway (the
two jobs then end in either order; the last success recorded is the newer job's).

Submitting goes through `JobService.submit`, the API's own path (the same preflight, store and
queue), with the schedule's id on the job. Adapters that fail preflight (trained on another
base, DoRA, unreadable) are left out and listed in the run; the job merges the others, unless
fewer than two remain. What the job's success makes later ticks skip is what it merged: an
adapter left out because it could not be read is tried again at the next tick (the rule is in
`collections`). The scheduler process fires ticks; `POST /v1/schedules/{id}/run` runs
one in the API process.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from redis.exceptions import RedisError

from merge_service.errors import PreflightError
from merge_service.settings import Settings
from merge_service.spec import JobSpec, ModelEntry, OutputSpec
from workers.jobs import new_job_id, now, timestamp
from workers.schedules.collections import (
    CollectionError,
    ResolvedCollection,
    fingerprint,
    prune_snapshots,
    resolve_collection,
)
from workers.schedules.models import LeftOut, PinnedAdapter, RunProblem, Schedule, ScheduleRun
from workers.schedules.store import ScheduleStore

if TYPE_CHECKING:
    from api.service import JobService

log = logging.getLogger("merge_service.scheduler")
SNAPSHOT_KEEP_S = 7 * 86400  # copies of local adapters no tick used for a week are removed
PRUNE_EVERY_S = 3600.0
Trigger = Literal["schedule", "manual"]
# the library's problems that say an input could not be read, not what it is: the Hub
# unreachable, refusing or offline, a file or directory unreadable or gone (any OSError's
# "[Errno N]"); see `merge_service.sources` (resolve, lora, checkpoint)
UNREADABLE = re.compile(r"cannot fetch Hub repo|cannot read|\[Errno \d+\]|not found \(or no "
                        r"access|is gated|^local source .* (does not exist|is a file)")


class TickInProgress(Exception):
    """Another tick of the same schedule is running."""


@dataclass
class Ticker:
    settings: Settings
    schedules: ScheduleStore
    jobs: JobService
    _pruned_at: float = field(default=-float("inf"), init=False)

    def tick(self, schedule_id: str, trigger: Trigger = "schedule", force: bool = False
             ) -> ScheduleRun | None:
        """Run one tick and record it. None when there is nothing to record (the schedule was
        deleted, or paused before a scheduled tick ran). Raises `TickInProgress` for a manual
        tick while another one runs."""
        lock = self.schedules.hold_tick(schedule_id)
        if lock is None:
            if trigger == "manual":
                raise TickInProgress(schedule_id)
            schedule = self.schedules.get(schedule_id)
            if schedule is None:
                return None
            return self.schedules.add_run(self._draft(schedule, trigger).done(
                "skipped", "the previous tick of this schedule is still running"))
        with lock:
            schedule = self.schedules.get(schedule_id)
            if schedule is None:
                self.schedules.remove_entry(schedule_id)  # a beat entry left by a race
                return None
            if schedule.paused and trigger == "schedule":
                return None
            draft = self._draft(schedule, trigger)
            try:
                run = self._run(schedule, draft, force)
            except RedisError:  # nowhere to record it: the scheduler logs it
                raise
            except Exception as exc:
                log.exception("schedule %s (%s): the tick failed", schedule.id, schedule.name)
                run = draft.done("failed", f"the tick failed: {_describe(exc)}")
            if run is None or self.schedules.add_run(run) is None:
                log.info("schedule %s: deleted during its tick; nothing recorded", schedule.id)
                return None
            log.info("schedule %s (%s): %s%s", schedule.id, schedule.name, run.status,
                     f" job {run.job_id}" if run.job_id else f": {run.reason}")
            return run

    def _prune(self) -> None:
        """At most once an hour per process: old snapshots of local adapters."""
        if time.monotonic() - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = time.monotonic()
        for path in prune_snapshots(self.settings.schedule_inputs_dir, SNAPSHOT_KEEP_S):
            log.info("removed the unused snapshot %s", path)

    def _draft(self, schedule: Schedule, trigger: Trigger) -> _Draft:
        return _Draft(id=new_job_id(), schedule_id=schedule.id, trigger=trigger,
                      started_at=now())

    def _run(self, schedule: Schedule, draft: _Draft, force: bool) -> ScheduleRun | None:
        self._prune()
        try:
            hub = self.settings.hub_for(schedule.hf_token_secret)
            found = resolve_collection(schedule.collection, schedule.base, hub,
                                       self.settings.schedule_inputs_dir,
                                       self.settings.local_root_paths)
        except PreflightError as exc:  # the schedule's token secret: gone or unreadable
            return draft.done("failed", str(exc), problems=[
                RunProblem.of(p) for p in exc.problems])
        except CollectionError as exc:
            return draft.done("failed", str(exc), problems=[RunProblem(message=str(exc))])
        draft.found(found)
        last_success, still_open = self.schedules.settle(schedule.id)
        if not force:
            if last_success is not None and last_success["fingerprint"] == found.fingerprint:
                return draft.done("skipped", "unchanged since the last successful run "
                                  f"(run {last_success['run_id']}, job "
                                  f"{last_success['job_id']})")
            if only_unread_changed(last_success, found.base, found.adapters, found.left_out):
                return draft.done("skipped", _unread_reason(last_success, found.left_out))
            pending = [j for j in still_open if j["fingerprint"] == found.fingerprint]
            if pending:
                return draft.done("skipped", f"job {pending[-1]['job_id']} for the same set is "
                                  f"still {pending[-1]['status']}")
            if still_open:  # one destination: a second job could end first and be overwritten
                job = still_open[-1]
                return draft.done("skipped", f"job {job['job_id']} is still {job['status']}; "
                                  "the change is merged after it ends")
        return self._submit(schedule, draft, found, None if force else last_success)

    def _submit(self, schedule: Schedule, draft: _Draft, found: ResolvedCollection,
                last_success: dict[str, Any] | None) -> ScheduleRun | None:
        """The run with the job submitted, or None when the schedule was deleted meanwhile (no
        job is left queued for it)."""
        from api.auth import Principal
        from api.errors import ApiError, Invalid

        candidates = list(found.adapters)
        destination = schedule.destination
        if not destination.startswith("hub://"):
            destination = str(Path(destination) / draft.id)
        draft.destination = destination
        # the jobs are the schedule creator's: that key may cancel them, as its own
        principal = Principal(self.schedules.owner(schedule.id) or "scheduler", "submit")
        while True:
            if len(candidates) < 2:
                left_out = len(draft.left_out)
                return draft.done("skipped", f"{len(candidates)} adapter(s) to merge"
                                  + (f" ({left_out} left out)" if left_out else "")
                                  + "; a merge needs at least 2")
            spec = job_spec(schedule, found.base, candidates, destination)
            if not self.schedules.exists(schedule.id):
                return None
            try:
                record, _ = self.jobs.submit(spec, principal, schedule_id=schedule.id,
                                             hub_secret=schedule.hf_token_secret)
            except Invalid as exc:
                names = {a.name: a for a in candidates}
                failing = {p.model for p in exc.problems if p.model in names}
                if not failing:  # the base, the method or the output: nothing to leave out
                    return draft.done("failed", exc.message, problems=[
                        RunProblem.of(p) for p in exc.problems])
                for name in sorted(failing):
                    adapter = names[name]
                    problems = [p for p in exc.problems if p.model == name]
                    unreadable = any(UNREADABLE.search(p.message) for p in problems)
                    draft.left_out.append(LeftOut(
                        name=name, origin=adapter.origin, revision=adapter.revision,
                        reason="could not be read; tried again at the next run" if unreadable
                        else "fails preflight", transient=unreadable,
                        problems=[RunProblem.of(p) for p in problems]))
                candidates = [a for a in candidates if a.name not in failing]
                unread = [o for o in draft.left_out if o.transient]
                if only_unread_changed(last_success, found.base, candidates, unread):
                    return draft.done("skipped", _unread_reason(last_success, unread))
                continue
            except ApiError as exc:
                return draft.done("failed", exc.message)
            # what the job merges (see `collections`): an adapter the preflight could not read
            # counts as unread, so that its success does not make the next tick skip it
            unread = [o for o in draft.left_out if o.transient]
            readable = _readable(found.adapters, unread)
            draft.fingerprint = fingerprint(found.base, readable, unread)
            if not self.schedules.add_open(schedule.id, record.id, draft.id, draft.fingerprint,
                                           base=found.base, merged=candidates):
                # deleted between the check above and now: the job is nobody's
                self.jobs.store.request_cancel(record.id)
                self.jobs.store.transition(record.id, "cancelled", {"queued"},
                                           finished_at=timestamp())
                return None
            draft.merged = [a.name for a in candidates]
            return draft.done("submitted", None, job_id=record.id)


def _readable(adapters: list[PinnedAdapter], unread: list[LeftOut]) -> list[PinnedAdapter]:
    """The adapters less those the preflight could not read."""
    left_out = {(o.origin, o.revision) for o in unread}
    return [a for a in adapters if (a.origin, a.revision) not in left_out]


def only_unread_changed(last_success: dict[str, Any] | None, base: str,
                        to_merge: list[PinnedAdapter], unread: list[LeftOut]) -> bool:
    """True when some adapters could not be read and a merge now would merge nothing the last
    successful run did not: each adapter `to_merge` was merged by it at the same revision, on
    the same base, and each adapter it merged that is missing now could not be read. Merging
    would only drop the unread ones from the destination until they are read again (adapters
    left out for good, then or now, are merged neither time and do not count)."""
    if not unread or last_success is None or "merged" not in last_success \
            or last_success.get("base") != base:
        return False
    last = {(origin, revision) for origin, revision in last_success["merged"]}
    now = {(a.origin, a.revision) for a in to_merge}
    unread_origins = {o.origin for o in unread}
    return now <= last and all(origin in unread_origins for origin, _ in last - now)


def _unread_reason(last_success: dict[str, Any] | None, unread: list[LeftOut]) -> str:
    assert last_success is not None
    return (f"unchanged since the last successful run (run {last_success['run_id']}, job "
            f"{last_success['job_id']}) but for {len(unread)} adapter(s) that could not be "
            f"read ({', '.join(sorted(o.origin for o in unread))}; see left_out); tried again "
            "at the next run")


def _describe(exc: BaseException) -> str:
    """`Type: message`, the message's first line, cut short (the traceback is in the log)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def job_spec(schedule: Schedule, base: str, adapters: list[PinnedAdapter], destination: str
             ) -> JobSpec:
    template = schedule.template
    return JobSpec(
        name=schedule.name, base=base,
        models=[ModelEntry(source=a.source, name=a.name) for a in adapters],
        method=template.method, space=template.space,
        output=OutputSpec(**template.output.model_dump(), destination=destination),
        options=template.options)


@dataclass
class _Draft:
    """A run being worked out."""

    id: str
    schedule_id: str
    trigger: Trigger
    started_at: Any
    fingerprint: str | None = None
    base: str | None = None
    adapters: list[PinnedAdapter] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    ignored: list[LeftOut] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    destination: str | None = None

    def found(self, found: ResolvedCollection) -> None:
        self.fingerprint = found.fingerprint
        self.base = found.base
        self.adapters = list(found.adapters)
        self.left_out = list(found.left_out)
        self.ignored = list(found.ignored)

    def done(self, status: str, reason: str | None, *, job_id: str | None = None,
             problems: list[RunProblem] | None = None) -> ScheduleRun:
        return ScheduleRun(
            id=self.id, schedule_id=self.schedule_id, trigger=self.trigger, status=status,
            reason=reason, started_at=self.started_at, finished_at=now(),
            fingerprint=self.fingerprint, base=self.base, adapters=self.adapters,
            merged=self.merged, left_out=self.left_out, ignored=self.ignored,
            problems=problems or [], job_id=job_id,
            destination=self.destination if job_id else None)
