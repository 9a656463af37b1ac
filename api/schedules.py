"""`/v1/schedules`: scheduled merges of adapter collections (DESIGN.md sections 4 and 6).

Roles, as for jobs: `read` lists and reads schedules and their runs; `submit` creates them;
pausing, resuming, running now and deleting a schedule are for the key that created it, or an
admin key. The scheduler process fires the ticks; `POST .../run` runs one here, at once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi import Path as PathParam

from api.auth import Principal, require
from api.errors import (
    ERROR_RESPONSES,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    error_response,
)
from api.routes import unique_keys
from merge_service.errors import PreflightError, Problem
from merge_service.methods import build_method
from merge_service.preflight import LocalPath, outside_roots_problems, target_rank_problems
from merge_service.settings import Settings
from merge_service.sinks.hub import hub_destination_problems
from workers.schedules.models import RunList, Schedule, ScheduleCreate, ScheduleList, ScheduleRun
from workers.schedules.store import ScheduleStore
from workers.schedules.ticks import Ticker, TickInProgress

router = APIRouter(responses=ERROR_RESPONSES, tags=["schedules"])
Reader = Annotated[Principal, require("read")]
Submitter = Annotated[Principal, require("submit")]
ScheduleId = Annotated[str, PathParam(description="a schedule id", max_length=64)]
_404 = error_response(404, "no such schedule")
_409 = error_response(409, "a tick of the schedule is running")


def _local_paths(body: ScheduleCreate) -> list[LocalPath]:
    """The local paths a schedule names (its Hub ids are not)."""
    collection = body.collection
    found = [LocalPath("base", body.base)] if Path(body.base).is_absolute() else []
    if collection.directory is not None:
        found.append(LocalPath("collection.directory", collection.directory))
    found += [LocalPath(f"collection.sources.{i}", source)
              for i, source in enumerate(collection.sources or []) if Path(source).is_absolute()]
    if not body.destination.startswith("hub://"):
        found.append(LocalPath("destination", body.destination))
    return found


class ScheduleService:
    def __init__(self, settings: Settings, schedules: ScheduleStore, ticker: Ticker) -> None:
        self.settings, self.schedules, self.ticker = settings, schedules, ticker

    def create(self, body: ScheduleCreate, principal: Principal) -> Schedule:
        problems = self._problems(body)
        if problems:
            raise Invalid(f"the schedule has {len(problems)} problem(s)", problems,
                          type="ScheduleError")
        return self.schedules.create(body, principal.name)

    def _problems(self, body: ScheduleCreate) -> list[Problem]:
        """What can be known before the first run: the method and its parameters, the
        destination, local paths."""
        params = dict(body.template.method.params)
        target_rank = params.pop("target_rank", None)  # of the `lora` output
        _, problems = build_method(body.template.method.name, params)
        problems += target_rank_problems(target_rank)
        problems = [Problem(p.message, field=f"template.{p.field}" if p.field else "template")
                    for p in problems]
        try:
            hub = self.settings.hub_for(body.hf_token_secret)
        except PreflightError as exc:
            problems += exc.problems
            hub = None
        if body.destination.startswith("hub://") and hub is not None:
            problems += [Problem(p.message, field="destination")
                         for p in hub_destination_problems(body.destination, hub)]
        local = _local_paths(body)
        roots = self.settings.local_root_paths
        outside = outside_roots_problems(local, roots) if roots else []
        problems += outside
        refused = {p.field for p in outside}
        for field, path, _ in local:  # the base and the collection are read at each run
            if field in {"base", "collection.directory"} - refused and not Path(path).is_dir():
                problems.append(Problem(f"{path} is not a directory", field=field))
        return problems

    def get(self, schedule_id: str) -> Schedule:
        schedule = self.schedules.get(schedule_id)
        if schedule is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        return schedule

    def _owned(self, schedule_id: str, principal: Principal, action: str) -> Schedule:
        schedule = self.get(schedule_id)
        if principal.role != "admin" and self.schedules.owner(schedule_id) != principal.name:
            raise Forbidden(f"only the key that created schedule {schedule_id}, or an admin key, "
                            f"may {action} it")
        return schedule

    def pause(self, schedule_id: str, principal: Principal, paused: bool) -> Schedule:
        self._owned(schedule_id, principal, "pause" if paused else "resume")
        schedule = self.schedules.set_paused(schedule_id, paused)
        if schedule is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        return self.get(schedule_id)

    def delete(self, schedule_id: str, principal: Principal) -> None:
        self._owned(schedule_id, principal, "delete")
        self.schedules.delete(schedule_id)

    def run_now(self, schedule_id: str, principal: Principal, force: bool) -> ScheduleRun:
        self._owned(schedule_id, principal, "run")
        try:
            run = self.ticker.tick(schedule_id, "manual", force=force)
        except TickInProgress:
            raise Conflict(f"a tick of schedule {schedule_id} is running; try again when it "
                           "ends") from None
        if run is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        if run.job_id:
            job = self.ticker.jobs.store.get(run.job_id)
            run.job_status = job.status if job else None
        return run

    def runs(self, schedule_id: str, limit: int) -> RunList:
        self.get(schedule_id)
        return RunList(runs=self.schedules.runs(schedule_id, limit))


_made = threading.Lock()
_EXAMPLES = {
    "hub_collection": {"summary": "every adapter of a Hub collection, nightly, to the Hub",
                       "value": {"name": "support-nightly", "cron": "0 2 * * *",
                                 "base": "sentence-transformers/all-MiniLM-L6-v2",
                                 "collection": {"hub_collection":
                                                "acme/support-adapters-6650f0c2a1b2c3d4e5f60718"},
                                 "template": {"method": {"name": "tsv"},
                                              "output": {"format": "lora"}},
                                 "destination": "hub://acme/support-merged"}},
    "directory": {"summary": "the adapters of a local directory, every 10 minutes",
                  "value": {"name": "local", "every_seconds": 600, "base": "/data/base",
                            "collection": {"directory": "/data/adapters"},
                            "template": {"method": {"name": "ties",
                                                   "params": {"density": 0.2}}},
                            "destination": "/data/merged"}},
}


def schedules(request: Request) -> ScheduleService:
    """The app's schedule service, made on first use from its job service."""
    state = request.app.state
    with _made:
        if getattr(state, "schedules", None) is None:
            jobs = state.service
            store = ScheduleStore.from_settings(jobs.settings, jobs.store)
            state.schedules = ScheduleService(jobs.settings, store,
                                              Ticker(jobs.settings, store, jobs))
    return state.schedules


@router.post("/v1/schedules", status_code=201, response_model=Schedule,
             responses=error_response(422, "every problem"),
             summary="Create a schedule", dependencies=[Depends(unique_keys)])
def create_schedule(request: Request, response: Response,
                    body: Annotated[ScheduleCreate, Body(
                        description="name, cron (5 fields, or 6 with seconds first) or "
                        "every_seconds, base, collection, template, destination",
                        openapi_examples=_EXAMPLES)],
                    principal: Submitter) -> Schedule:
    schedule = schedules(request).create(body, principal)
    response.headers["Location"] = f"/v1/schedules/{schedule.id}"
    return schedule


@router.get("/v1/schedules", response_model=ScheduleList, summary="List schedules, newest first")
def list_schedules(request: Request, principal: Reader) -> ScheduleList:
    return ScheduleList(schedules=schedules(request).schedules.list())


@router.get("/v1/schedules/{schedule_id}", response_model=Schedule, responses=_404,
            summary="A schedule, with its latest run")
def get_schedule(request: Request, schedule_id: ScheduleId, principal: Reader) -> Schedule:
    return schedules(request).get(schedule_id)


@router.delete("/v1/schedules/{schedule_id}", status_code=204, responses=_404,
               response_class=Response, summary="Delete a schedule and its run history")
def delete_schedule(request: Request, schedule_id: ScheduleId, principal: Submitter
                    ) -> Response:
    schedules(request).delete(schedule_id, principal)
    return Response(status_code=204)


@router.post("/v1/schedules/{schedule_id}/pause", response_model=Schedule, responses=_404,
             summary="Pause: no run until resumed")
def pause_schedule(request: Request, schedule_id: ScheduleId, principal: Submitter
                   ) -> Schedule:
    return schedules(request).pause(schedule_id, principal, True)


@router.post("/v1/schedules/{schedule_id}/resume", response_model=Schedule, responses=_404,
             summary="Resume: the next run one period from now")
def resume_schedule(request: Request, schedule_id: ScheduleId, principal: Submitter
                    ) -> Schedule:
    return schedules(request).pause(schedule_id, principal, False)


@router.post("/v1/schedules/{schedule_id}/run", response_model=ScheduleRun,
             responses={**_404, **_409}, summary="Run a tick now")
def run_schedule(request: Request, schedule_id: ScheduleId, principal: Submitter,
                 force: Annotated[bool, Query(description="submit a job even when the "
                                              "collection is unchanged, or while a job of "
                                              "the schedule has not ended (both push to the "
                                              "destination, in the order they end)")] = False
                 ) -> ScheduleRun:
    return schedules(request).run_now(schedule_id, principal, force)


@router.get("/v1/schedules/{schedule_id}/runs", response_model=RunList, responses=_404,
            summary="The schedule's runs, newest first: skipped (with the reason), failed, or "
            "the job submitted")
def list_schedule_runs(request: Request, schedule_id: ScheduleId, principal: Reader,
                       limit: Annotated[int, Query(ge=1, le=500)] = 50) -> RunList:
    return schedules(request).runs(schedule_id, limit)
