"""A schedule (what to merge, when, where to) and the record of each of its runs."""

from __future__ import annotations

import calendar
import os
import re
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Literal

from celery.schedules import crontab, crontab_parser
from dateutil.rrule import SECONDLY
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from redbeat.schedules import rrule

from merge_service.errors import Problem
from merge_service.spec import MethodSpec, Options, OutputOptions, Space
from workers.jobs import JobStatus

# `namespace/title-slug-<24 hex>`, as the Hub names collections
COLLECTION_SLUG = re.compile(r"^[\w.-]+/[\w.-]+-[0-9a-f]{24}$")
# a Hub source of a collection: `org/name[@revision]` (`name` alone for the few unnamespaced)
HUB_SOURCE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")
SCHEDULE_ID = re.compile(r"^[0-9a-f]{20}$")
# the fields of a 6-field cron, seconds first, with their ranges as crontab_parser takes them
# (max_, min_): seconds and minutes 0-59, hours 0-23, days 1-31, months 1-12, weekdays 0-7
# (0 and 7 are both Sunday, as in standard cron; 7 is mapped to 0 before Celery sees it)
CRON_FIELDS = (("second", 60, 0), ("minute", 60, 0), ("hour", 24, 0), ("day", 31, 1),
               ("month", 12, 1), ("weekday", 8, 0))
# Quartz's and some crons' extensions, which Celery does not have: `sun#1` would be read as
# every Sunday (Celery drops what follows `#` after a name), so each is refused by name
CRON_EXTENSIONS = {"#": "'#' (nth weekday of the month)", "?": "'?' (no specific value)",
                   "L": "'L' (last day or weekday of the month)",
                   "W": "'W' (nearest weekday)", "LW": "'LW' (last weekday of the month)"}

_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")
_WEEKDAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
# the words each field may hold: abbreviations (cron's) and whole names, any case
CRON_NAMES = {"month": {*_MONTHS, *(m[:3] for m in _MONTHS)},
              "weekday": {*_WEEKDAYS, *(d[:3] for d in _WEEKDAYS)}}


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

    # each field's own check is a field validator: a problem of one field does not hide
    # another's, and each names its field
    @field_validator("hub_collection")
    @classmethod
    def _slug(cls, value: str | None) -> str | None:
        if value is not None and not COLLECTION_SLUG.match(value):
            raise ValueError(f"hub_collection {value!r} is not a collection slug "
                             "(namespace/title-<24 hex digits>)")
        return value

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[str] | None) -> list[str] | None:
        """A local source is absolute (a relative path would be read from wherever the process
        that ticks was started: the API's directory for a run now, the scheduler's for the
        others), anything else a Hub id; each source once (twice would merge it twice)."""
        seen: dict[str, int] = {}
        sources = value or []
        for i, source in enumerate(sources):
            if PurePosixPath(source).is_absolute():
                identity = str(PurePosixPath(os.path.normpath(source)))
            elif HUB_SOURCE.match(source):
                repo_id, _, revision = source.partition("@")
                identity = f"{repo_id}@{revision or 'main'}"
            else:
                raise ValueError(f"sources.{i} {source!r}: neither a Hub id "
                                 "(org/name[@revision]) nor an absolute local directory")
            if identity in seen:
                first = seen[identity]
                raise ValueError(f"sources.{i} {source!r}: the same adapter as sources.{first} "
                                 f"{sources[first]!r}")
            seen[identity] = i
        return value

    @field_validator("directory")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not PurePosixPath(value).is_absolute():
            raise ValueError("directory must be an absolute path on the service's machines")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> CollectionSpec:
        given = [k for k in ("hub_collection", "sources", "directory") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of hub_collection, sources, directory")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("hub_collection", "sources", "directory") if getattr(self, k))


class OutputTemplate(OutputOptions):
    """`output` of the job spec, less the destination (the schedule's, per run)."""


class SpecTemplate(_Strict):
    """The job spec of every run, less `base`, `models` and `output.destination`."""

    method: MethodSpec
    space: Space = "auto"
    output: OutputTemplate = Field(default_factory=OutputTemplate)
    options: Options = Field(default_factory=Options)


class ScheduleCreate(_Strict):
    name: str = Field(min_length=1, max_length=100, description="free text; also the name of "
                      "the jobs it submits")
    cron: str | None = Field(None, description="cron, UTC: 5 fields `minute hour day month "
                             "weekday`, e.g. `0 2 * * *`, or 6 with seconds first `second "
                             "minute hour day month weekday`, e.g. `*/30 * * * * *`; weekday "
                             "0, 7 or sun is Sunday; no `#`, `L`, `W` or `?`; when both day and "
                             "weekday are restricted, a run needs both to match (cron's usual "
                             "rule is either)")
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
    hf_token_secret: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="the name of a secret holding the Hub token this schedule's runs read and "
        "push with (the file MERGE_SERVICE_SECRETS_DIR/NAME, e.g. a Docker secret); default: "
        "MERGE_SERVICE_HF_TOKEN. The name is stored, never the token")

    @field_validator("base")
    @classmethod
    def _base(cls, value: str) -> str:
        if not PurePosixPath(value).is_absolute() and not HUB_SOURCE.match(value):
            raise ValueError(f"base {value!r}: neither a Hub id (org/name[@revision]) nor an "
                             "absolute local directory")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            cron_schedule(value)  # raises ValueError with the reason
        return value

    @field_validator("destination")
    @classmethod
    def _destination(cls, value: str) -> str:
        if not value.startswith("hub://") and not PurePosixPath(value).is_absolute():
            raise ValueError("destination must be hub://org/name or an absolute local directory")
        return value

    @model_validator(mode="after")
    def _when(self) -> ScheduleCreate:
        if (self.cron is None) == (self.every_seconds is None):
            raise ValueError("give exactly one of cron, every_seconds")
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
    transient: bool = Field(False, description="left out for a reason that may pass (it "
                            "could not be read or fetched): a later run tries it again; else "
                            "for what it is at that revision (another base, DoRA, its config)")


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
    fingerprint: str | None = Field(None, description="sha256 of the set the run stands for: "
                                    "the base, each adapter merged or left out for what it is "
                                    "at its revision, and (by origin) each adapter that could "
                                    "not be read; a run whose job succeeded makes later runs "
                                    "with the same fingerprint skips")
    base: str | None = Field(None, description="the base the job merges onto: a Hub base pinned "
                             "to its commit (a new commit there is a change, as an adapter's is)")
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


def _check_names(expression: str, fields: list[str]) -> None:
    """Names only where cron has them, each field only its own: Celery's parser takes any
    word whose first three letters name a month or a weekday in any field (`* * * mon *` would
    run in January, `0 2 * * marble` on Wednesdays)."""
    for (name, _, _), field in zip(CRON_FIELDS[-len(fields):], fields, strict=True):
        words = re.findall(r"[A-Za-z]+", field)
        for extension in [c for c in "#?" if c in field] + [w.upper() for w in words
                                                           if w.upper() in {"L", "W", "LW"}]:
            raise ValueError(f"cron {expression!r}: {name} {field!r}: "
                             f"{CRON_EXTENSIONS[extension]} is not supported; use "
                             "numbers, names, ranges, lists and steps")
        for word in words:
            if name not in CRON_NAMES:
                raise ValueError(f"cron {expression!r}: {name} {field!r}: names are allowed "
                                 "only in the month (jan-dec) and weekday (sun-sat) fields")
            if word.lower() not in CRON_NAMES[name]:
                raise ValueError(f"cron {expression!r}: {name} {field!r}: {word!r} is not a "
                                 f"{name} ({'jan-dec' if name == 'month' else 'sun-sat'})")


def _weekdays(field: str) -> set[int]:
    """A weekday field as the days it names, 0-6 from Sunday (7, cron's other Sunday, as 0)."""
    return {day % 7 for day in crontab_parser(8, 0).parse(field)}


def cron_schedule(expression: str) -> crontab | rrule:
    """A cron expression as a beat schedule, UTC; ValueError naming the problem.

    5 fields: a Celery crontab. 6 fields (seconds first): celery-redbeat's rrule, every matching
    second from now on; redbeat stores it in Redis and reads it back (a schedule class of ours
    would not survive its JSON decoder). Both match a restricted day and weekday together, as
    Celery's crontab does."""

    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"cron {expression!r}: expected 5 fields (minute hour day month "
                         "weekday) or 6 (second minute hour day month weekday)")
    _check_names(expression, fields)
    if len(fields) == 5:
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        try:
            # as a list in text: redbeat stores the crontab as written, in JSON
            weekday_list = "*" if day_of_week == "*" else ",".join(
                str(day) for day in sorted(_weekdays(day_of_week)))
        except Exception as exc:  # ValueError or celery's ParseException
            raise ValueError(f"cron {expression!r}: weekday {day_of_week!r}: {exc}") from None
        try:
            return crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                           month_of_year=month_of_year, day_of_week=weekday_list)
        except Exception as exc:  # celery raises ValueError or its own ParseException
            raise ValueError(f"cron {expression!r}: {exc}") from None
    by: dict[str, list[int] | None] = {}
    for (name, max_, min_), field in zip(CRON_FIELDS, fields, strict=True):
        try:
            by[name] = None if field == "*" else sorted(
                _weekdays(field) if name == "weekday" else crontab_parser(max_, min_).parse(field))
        except Exception as exc:  # ValueError or celery's ParseException
            raise ValueError(f"cron {expression!r}: {name} {field!r}: {exc}") from None
    # dateutil would look for a date that never comes until the year 9999; 2000 is a leap year
    # (February 29 does come)
    if not any(day <= calendar.monthrange(2000, month)[1]
               for month in by["month"] or range(1, 13) for day in by["day"] or range(1, 32)):
        raise ValueError(f"cron {expression!r}: day {fields[3]!r} never occurs in month "
                         f"{fields[4]!r}")
    weekdays = by["weekday"]
    return rrule(SECONDLY, dtstart=datetime.now(UTC).replace(microsecond=0),
                 bysecond=by["second"], byminute=by["minute"], byhour=by["hour"],
                 bymonthday=by["day"], bymonth=by["month"],
                 # cron counts weekdays from Sunday = 0, dateutil from Monday = 0
                 byweekday=None if weekdays is None else sorted((d - 1) % 7 for d in weekdays))


def rule_from(rule: rrule, start: datetime) -> rrule:
    """A 6-field cron's rule counted from `start` (to the second) instead of from its creation.

    The runs after `start` are the same (every matching second is one), but dateutil walks
    every run from the rule's start at each look-up: from a creation days back, a `* * * * * *`
    rule would take seconds a look-up, and the scheduler looks up each due entry every tick."""
    return rrule(SECONDLY, dtstart=start.replace(microsecond=0), app=rule.app,
                 **{arg: getattr(rule, arg) for arg in (
                     "bysecond", "byminute", "byhour", "bymonthday", "bymonth", "byweekday")})


Schedule.model_rebuild()
