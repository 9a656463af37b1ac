"""Response bodies of the API (the job record itself is `workers.jobs.JobRecord`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.jobs import JobProgress, JobRecord, JobState


class JobList(BaseModel):
    jobs: list[JobRecord]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; "
                                                       "null on the last page")


class MethodInfo(BaseModel):
    name: str
    summary: str
    output_formats: list[str]
    spaces: list[str] = Field(description="the spaces it runs in for LoRA inputs (`space`; "
                              "full checkpoints are always merged in full space)")
    weights: bool = Field(description="whether it takes per-model `weight`s (false: a weight "
                          "other than 1 is refused)")
    params: dict[str, dict[str, Any]] = Field(description="name -> type, default, description, "
                                                           "bounds")


class Health(BaseModel):
    status: str = "ok"


class WorkerInfo(BaseModel):
    name: str
    hostname: str
    pid: int
    queues: list[str]
    started_at: str


class Readiness(BaseModel):
    ready: bool
    redis: bool
    live_workers: int
    workers: list[WorkerInfo] = Field(description="each live worker; for a caller with a key of "
                                      "role read or above (or in local mode), else empty")
    problems: list[str] = Field(default_factory=list)


_STREAM_JOB_ID = Field(None, description="`GET /v1/events` only: the job the event is about")


class JobStateEvent(JobState):
    """The `data` of an `event: state` (the job's state after a change)."""

    job_id: str | None = _STREAM_JOB_ID


class JobProgressEvent(JobProgress):
    """The `data` of an `event: progress`."""

    model_config = ConfigDict(extra="forbid")
    job_id: str | None = _STREAM_JOB_ID


EVENT_MODELS: dict[str, type[BaseModel]] = {"state": JobStateEvent, "progress": JobProgressEvent}
