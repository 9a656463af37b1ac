"""The endpoints of DESIGN.md section 4 (schedules come with the scheduler). Each one checks
the caller's role, calls one `JobService` method and returns a model."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, optional_principal, require
from api.errors import (
    ERROR_RESPONSES,
    BadRequest,
    Invalid,
    Unavailable,
    error_response,
)
from api.metrics import CONTENT_TYPE
from api.models import EVENT_MODELS, Health, JobList, MethodInfo, Readiness
from api.service import JobService
from api.sse import EVENT_ID, all_events, check_event_id, job_events, latest_event_id
from merge_service.errors import SpecError
from merge_service.spec import JobSpec, duplicate_key_problem, spec_from_dict
from workers.jobs import JOB_ID, JobRecord, JobStatus

router = APIRouter(responses=ERROR_RESPONSES)
Reader = Annotated[Principal, require("read")]
Submitter = Annotated[Principal, require("submit")]
JobId = Annotated[str, Path(description="a job id", max_length=64)]
LastEventId = Annotated[str | None, Header(
    description="resume after this event: the `id` of the last event received",
    json_schema_extra={"pattern": EVENT_ID.pattern})]
_404 = error_response(404, "no such job")
_409 = error_response(409, "not possible in the job's state")
_422 = error_response(422, "every problem of the spec")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# without a schema, a generated client discards the body; not for the event streams, where
# tools read an OpenAPI 3.1 `schema` as that of each event: their events' `data` schemas are
# named in `x-events` instead (components added by `api.app`)
_TEXT = {"schema": {"type": "string"}}
_SSE = {"text/event-stream": {"x-events": {
    name: {"$ref": f"#/components/schemas/{model.__name__}"}
    for name, model in EVENT_MODELS.items()}}}


def service(request: Request) -> JobService:
    return request.app.state.service


class JSONText(Response):
    """JSON already serialised (the job store's hot read paths); documented by the route's
    `response_model`."""

    media_type = "application/json"


async def unique_keys(request: Request) -> None:
    """A key given twice in one object of the JSON body is a problem, as in a spec file (a
    JSON parser keeps the last one silently)."""
    problem = duplicate_key_problem(await request.body())
    if problem is not None:
        raise Invalid("the body has 1 problem(s)", [problem])


class _SpecRoute(APIRoute):
    """`POST /v1/jobs`: a 422 for a spec with unknown fields or invalid values also lists what
    preflight finds in the rest of it (FastAPI's validation of the body stops at the schema)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def every_problem(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                if not isinstance(exc.body, dict) or \
                        any(error["loc"][:1] != ("body",) for error in exc.errors()):
                    raise
                try:
                    spec_from_dict(exc.body)
                except SpecError as error:
                    problems = await run_in_threadpool(service(request).every_problem, error)
                    raise Invalid(f"the request has {len(problems)} problem(s)", problems,
                                  type="SpecError") from None
                raise

        return every_problem


_submit = APIRouter(route_class=_SpecRoute, responses=ERROR_RESPONSES)


@_submit.post("/v1/jobs", status_code=202, response_model=JobRecord, tags=["jobs"],
             responses={**_422, **_409}, summary="Submit a job spec",
             dependencies=[Depends(unique_keys)])
def create_job(request: Request, response: Response,
               spec: Annotated[JobSpec, Body(description="a job spec (DESIGN.md section 2)")],
               principal: Submitter,
               idempotency_key: Annotated[str | None, Header(
                   max_length=200, description="the same key (and spec) returns the job "
                   "created the first time, for 24 hours")] = None) -> JobRecord:
    record, replayed = service(request).submit(spec, principal, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return record


router.include_router(_submit)


@router.get("/v1/jobs", response_model=JobList, tags=["jobs"], summary="List jobs, newest first")
async def list_jobs(request: Request, principal: Reader,
                    status: JobStatus | None = None, name: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    cursor: Annotated[str | None, Query(
                        description="`next_cursor` of the previous page",
                        json_schema_extra={"pattern": JOB_ID.pattern})] = None) -> JSONText:
    if cursor is not None and not JOB_ID.match(cursor):
        raise BadRequest("invalid cursor: pass the `next_cursor` of a previous page")
    return JSONText(await service(request).list_json(request.app.state.async_redis, status,
                                                     name, limit, cursor))


@router.get("/v1/jobs/{job_id}", response_model=JobRecord, tags=["jobs"], responses=_404,
            summary="A job record")
async def get_job(request: Request, job_id: JobId, principal: Reader) -> JSONText:
    return JSONText(await service(request).get_json(request.app.state.async_redis, job_id))


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
            summary="Server-Sent Events: state changes and progress",
            responses={**_404, 200: {"content": _SSE, "description": "`event: state` "
                                     "(`data`: JobStateEvent) or `event: progress` (`data`: "
                                     "JobProgressEvent)"}})
def get_job_events(request: Request, job_id: JobId, principal: Reader,
                   last_event_id: LastEventId = None) -> StreamingResponse:
    svc = service(request)
    after = check_event_id(last_event_id)
    svc.get(job_id)  # 404 before the stream starts
    stream = job_events(request.app.state.stream_redis, svc.store, job_id, after)
    return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)


@router.get("/v1/events", tags=["jobs"], response_class=StreamingResponse,
            summary="Server-Sent Events of every job: creation, state changes and progress",
            description="The events of `GET /v1/jobs/{job_id}/events` for all jobs on one "
            "stream, each `data` with its `job_id` (a new job: its `queued` state event). "
            "Starts after the newest event at the time of the request (or after "
            "`Last-Event-ID`) and stays open; a `: keepalive` comment comes every 15 s "
            "without events. Resumed after events that are no longer kept, it first sends "
            "`event: reset` (read the job list again).",
            responses={200: {"content": _SSE, "description": "`event: state` (`data`: "
                             "JobStateEvent) or `event: progress` (`data`: JobProgressEvent), "
                             "each with `job_id`; `event: reset` (read the job list again)"}})
async def get_all_events(request: Request, principal: Reader,
                         last_event_id: LastEventId = None
                         ) -> StreamingResponse:
    store = service(request).store
    after = (check_event_id(last_event_id) if last_event_id
             else await latest_event_id(request.app.state.async_redis, store))
    stream = all_events(request.app.state.stream_redis, store, after)
    return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)


@router.get("/v1/jobs/{job_id}/report", tags=["jobs"], responses={**_404, **_409},
            summary="merge_report.json of a succeeded job")
def get_job_report(request: Request, job_id: JobId, principal: Reader
                   ) -> dict[str, Any]:
    return service(request).report(job_id)


@router.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=JobRecord,
             tags=["jobs"], responses={**_404, **_409}, summary="Cancel a job (cooperative)")
def cancel_job(request: Request, job_id: JobId, principal: Submitter
               ) -> JobRecord:
    return service(request).cancel(job_id, principal)


@router.post("/v1/jobs/{job_id}/retry", status_code=202, response_model=JobRecord,
             tags=["jobs"], responses={**_404, **_409, **_422},
             summary="A new job with the same (resolved) spec")
def retry_job(request: Request, job_id: JobId, principal: Submitter
              ) -> JobRecord:
    return service(request).retry(job_id, principal)


@router.get("/v1/methods", response_model=list[MethodInfo], tags=["methods"],
            summary="The method catalog")
def list_methods(principal: Reader) -> list[dict[str, Any]]:
    return JobService.methods()


@router.get("/healthz", response_model=Health, tags=["operations"], summary="Liveness")
def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, tags=["operations"],
            responses={503: {"model": Readiness, "description": "not ready"}},
            summary="Readiness: Redis reachable and at least one live worker",
            description="Answers without a key too; `workers` is then empty (except in local "
            "mode).",
            # FastAPI appends this to the key requirement: a key, or none
            openapi_extra={"security": [{}]})
def readyz(request: Request, response: Response,
           caller: Annotated[Principal | None, optional_principal()]) -> Readiness:
    readiness = Readiness.model_validate(service(request).readiness())
    if caller is None:  # a probe needs the answer, not the hosts and pids behind it
        readiness.workers = []
    if not readiness.ready:
        response.status_code = 503
    return readiness


@router.get("/metrics", tags=["operations"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: _TEXT}}}, summary="Prometheus metrics")
def metrics(request: Request, principal: Reader) -> Response:
    try:
        body = request.app.state.metrics.render()
    except Exception as exc:
        raise Unavailable(f"metrics unavailable: {type(exc).__name__}") from None
    return Response(body, media_type=CONTENT_TYPE)
