"""A schedule (what to merge, when, where to) and the record of each of its runs."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import PurePosixPath
from typing import Literal

from celery.schedules import crontab
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_service.errors import Problem
from merge_service.spec import MethodSpec, Options, OutputDtype, OutputFormat, Space, parse_size
from workers.jobs import JobStatus

# `namespace/title-slug-<24 hex>`, as the Hub names collections
COLLECTION_SLUG = re.compile(r"^[\w.-]+/[\w.-]+-[0-9a-f]{24}$")
SCHEDULE_ID = re.compile(r"^[0-9a-f]{20}$")
RUN_ID = SCHEDULE_ID


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CollectionSpec(_Strict):
    """Exactly one of the three kinds of collection."""

    hub_collection: str | None = Field(
        None, description="a Hub collection slug (`namespace/title-<24 hex>`): its model items "
        "that are LoRA adapters, each pinned to its current commit")
    sources: list[str] | None = Field(
        None, min_length=2, description="Hub ids `org/name[@revision]` (pinned to the commit) "
        "or absolute local directories (pinned by content hash)")
    directory: str | None = Field(
        None, description="an absolute local directory whose subdirectories are LoRA "
        "adapters; each is pinned by the hash of its files")

    @model_validator(mode="after")
    def _one_kind(self) -> CollectionSpec:
        given = [k for k in ("hub_collection", "sources", "directory") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of hub_collection, sources, directory")
        if self.hub_collection is not None and not COLLECTION_SLUG.match(self.hub_collection):
            raise ValueError(f"hub_collection {self.hub_collection!r} is not a collection slug "
                             "(namespace/title-<24 hex digits>)")
        if self.directory is not None and not PurePosixPath(self.directory).is_absolute():
            raise ValueError("directory must be an absolute path on the service's machines")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("hub_collection", "sources", "directory") if getattr(self, k))


class OutputTemplate(_Strict):
    """`output` of the job spec, less the destination (the schedule's, per run)."""

    format: OutputFormat = "full"
    dtype: OutputDtype | None = None
    private: bool = True
    create_pr: bool = False
    shard_size: str | int = "5GB"

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        parse_size(value)
        return value


class SpecTemplate(_Strict):
    """The job spec of every run, less `base`, `models` and `output.destination`."""

    method: MethodSpec
    space: Space = "auto"
    output: OutputTemplate = Field(default_factory=OutputTemplate)
    options: Options = Field(default_factory=Options)


class ScheduleCreate(_Strict):
    name: str = Field(min_length=1, max_length=100, description="free text; also the name of "
                      "the jobs it submits")
    cron: str | None = Field(None, description="5-field cron `minute hour day month weekday` "
                             "(UTC), e.g. `0 2 * * *`")
    every_seconds: int | None = Field(None, ge=1, le=366 * 86400,
                                      description="instead of `cron`: a run every N seconds")
    base: str = Field(min_length=1, description="the base model: Hub id[@revision] or an "
                      "absolute local directory")
    collection: CollectionSpec
    template: SpecTemplate
    destination: str = Field(min_length=1, description="an absolute local directory (each run "
                             "writes DESTINATION/RUN_ID) or hub://org/name (each run pushes a "
                             "commit)")
    paused: bool = Field(False, description="created paused: no run until resumed")

    @model_validator(mode="after")
    def _when(self) -> ScheduleCreate:
        if (self.cron is None) == (self.every_seconds is None):
            raise ValueError("give exactly one of cron, every_seconds")
        if self.cron is not None:
            cron_schedule(self.cron)  # raises ValueError with the reason
        if not self.destination.startswith("hub://") \
                and not PurePosixPath(self.destination).is_absolute():
            raise ValueError("destination must be hub://org/name or an absolute local directory")
        return self


class Schedule(ScheduleCreate):
    id: str
    created_at: datetime
    last_run: ScheduleRun | None = Field(None, description="the latest run, if any")


class ScheduleList(BaseModel):
    schedules: list[Schedule]


# --- runs ------------------------------------------------------------------------------------

RunStatus = Literal["submitted", "skipped", "failed"]


class RunProblem(BaseModel):
    message: str
    model: str | None = None
    tensor: str | None = None
    field: str | None = None

    @classmethod
    def of(cls, problem: Problem) -> RunProblem:
        return cls(**problem.to_dict())


class PinnedAdapter(BaseModel):
    name: str = Field(description="its task name in the job")
    origin: str = Field(description="where it was found: a Hub repo id or a local directory")
    revision: str = Field(description="Hub commit sha, or sha256 of a local adapter's files")
    source: str = Field(description="what the job spec reads: `repo@sha`, or a snapshot of the "
                        "local adapter under DATA_DIR")


class LeftOut(BaseModel):
    name: str | None = None
    origin: str
    revision: str | None = None
    reason: str
    problems: list[RunProblem] = Field(default_factory=list)


class ScheduleRun(BaseModel):
    id: str
    schedule_id: str
    trigger: Literal["schedule", "manual"]
    status: RunStatus = Field(description="submitted: a job was queued; skipped: nothing to do "
                              "(see reason); failed: the collection or spec is wrong (see "
                              "problems)")
    reason: str | None = None
    started_at: datetime
    finished_at: datetime | None = None
    fingerprint: str | None = Field(None, description="sha256 of the resolved set")
    adapters: list[PinnedAdapter] = Field(default_factory=list,
                                          description="the resolved set, pinned")
    merged: list[str] = Field(default_factory=list, description="names of the adapters the "
                              "job merges (the resolved set less `left_out`)")
    left_out: list[LeftOut] = Field(default_factory=list, description="adapters that failed "
                                    "preflight (wrong base, DoRA, ...) or could not be read")
    ignored: list[LeftOut] = Field(default_factory=list, description="collection items that "
                                   "are not LoRA adapters")
    problems: list[RunProblem] = Field(default_factory=list)
    job_id: str | None = None
    job_status: JobStatus | None = Field(None, description="the job's status when read")
    destination: str | None = None


class RunList(BaseModel):
    runs: list[ScheduleRun] = Field(description="newest first")


def cron_schedule(expression: str) -> crontab:
    """A 5-field cron expression as a Celery crontab; ValueError naming the problem."""

    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"cron {expression!r}: expected 5 fields (minute hour day month "
                         "weekday); for seconds use every_seconds")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        schedule = crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                           month_of_year=month_of_year, day_of_week=day_of_week)
    except Exception as exc:  # celery raises ValueError or its own ParseException
        raise ValueError(f"cron {expression!r}: {exc}") from None
    return schedule


Schedule.model_rebuild()
