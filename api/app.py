"""`create_app(settings)`: the FastAPI application (OpenAPI at /docs, /openapi.json).

    uvicorn --factory api.app:app_from_env      # or: merge-service api
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from api.auth import LocalOnly, parse_api_keys
from api.dashboard import router as dashboard_router
from api.docs import router as docs_router
from api.errors import ApiError, BadRequest, ErrorBody, ErrorResponse, Invalid, Unavailable
from api.metrics import ApiMetrics, MetricsMiddleware
from api.models import EVENT_MODELS
from api.routes import router
from api.schedules import router as schedules_router
from api.service import JobService
from api.sse import STREAM_SOCKET_TIMEOUT_S
from merge_service import __version__
from merge_service.errors import Problem
from merge_service.settings import Settings
from merge_service.spec import problem_from_pydantic
from workers.celery_app import make_celery
from workers.jobs import JobStore

log = logging.getLogger("merge_service.api")

DESCRIPTION = """Merge fine-tuned models and LoRA adapters as a service.

Submit a job spec to `POST /v1/jobs`; a worker runs it; follow it with
`GET /v1/jobs/{id}/events` (Server-Sent Events) or poll `GET /v1/jobs/{id}`;
`GET /v1/events` streams the events of every job.
Authenticate with `Authorization: Bearer <key>` when the server has keys configured.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    store = JobStore.from_url(settings.redis_url_or_default)
    metrics = ApiMetrics(store, worker_ttl=3 * settings.heartbeat_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # what imports and startup made (torch and the method catalog come with preflight:
        # some 230 000 objects) is never garbage: out of the collector's sight, a full
        # collection takes well under a millisecond instead of 100 ms, which a polling
        # client would otherwise see as its slowest responses
        gc.collect()  # garbage frozen now would never be freed
        gc.freeze()
        app.state.async_redis = aioredis.Redis.from_url(settings.redis_url_or_default,
                                                        decode_responses=True)
        # SSE reads block up to the keepalive interval: their own pool, with a socket timeout
        # above it (the default 5 s would break every stream quiet for 5 s); requests keep
        # the short timeout, so a hung Redis is a quick 503
        app.state.stream_redis = aioredis.Redis.from_url(
            settings.redis_url_or_default, decode_responses=True,
            socket_timeout=STREAM_SOCKET_TIMEOUT_S)
        try:
            yield
        finally:
            await app.state.stream_redis.aclose()
            await app.state.async_redis.aclose()
            store.r.close()

    app = FastAPI(title="merge-service", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None,  # /docs: api/docs.py
                  # operation ids are the function names: create_job, list_jobs, ...
                  generate_unique_id_function=lambda route: route.name)
    app.state.settings = settings
    app.state.api_keys = parse_api_keys(settings.api_keys)
    app.state.service = JobService(settings, store, make_celery(settings), metrics)
    app.state.metrics = metrics
    app.include_router(router)
    app.include_router(schedules_router)
    app.include_router(dashboard_router)  # the pages at /, and POST /v1/jobs:validate
    app.include_router(docs_router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if not app.state.api_keys:
        app.add_middleware(LocalOnly)
    app.openapi = _document(app, keys_optional=not app.state.api_keys)  # type: ignore[method-assign]
    return app


def _document(app: FastAPI, keys_optional: bool) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI document, plus the schemas of the event streams' `data` (which no
    route returns as JSON, so FastAPI leaves them out). In local mode it says what the
    server does: a request needs no key (each operation's security also allows none)."""
    document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = document()  # FastAPI's, which keeps it in app.openapi_schema
        _, events = models_json_schema([(model, "serialization") for model in
                                        EVENT_MODELS.values()],
                                       ref_template="#/components/schemas/{model}")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in events["$defs"].items():
            schemas.setdefault(name, schema)
        if keys_optional:
            for item in doc["paths"].values():
                for operation in item.values():
                    security = operation.get("security")
                    if security and {} not in security:
                        security.append({})
        return doc

    return openapi


def app_from_env() -> FastAPI:
    return create_app(Settings())


# --- errors: one shape everywhere ------------------------------------------------------------

async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: a 500 in the error shape, without the exception's text (Starlette re-raises it
    after this answer, so the traceback goes to the server's log)."""
    return await _api_error(request, ApiError(
        "internal error; the server's log has the details"))


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    """Redis down, full or slow: a 503 in the error shape (the error's text, which names the
    Redis address, stays in the server's log)."""
    log.warning("%s %s: Redis failed: %r", request.method, request.url.path, exc)
    return await _api_error(request, Unavailable(
        f"the job store (Redis) is unavailable ({type(exc).__name__}); try again shortly",
        headers={"Retry-After": "5"}))


# the error type of a body's schema problems: the one its other problems have
_BODY_ERRORS = {"/v1/jobs": "SpecError", "/v1/schedules": "ScheduleError"}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e["type"] == "json_invalid" or (tuple(e["loc"]) == ("body",) and e["type"] != "missing"
                                            and not isinstance(e.get("input"), dict))
           for e in errors):  # not JSON, or JSON but not an object (a string, a list, null)
        return await _api_error(request, BadRequest(
            "the body must be a JSON object (Content-Type: application/json)"))
    problems = [_problem(e) for e in errors]
    # a body's problems are typed as the rest of its problems are (a job spec's SpecError, a
    # schedule's ScheduleError); a query parameter's are an InvalidRequest
    body_type = _BODY_ERRORS.get(request.url.path) \
        if all(e["loc"][:1] == ("body",) for e in errors) else None
    return await _api_error(request, Invalid(f"the request has {len(problems)} problem(s)",
                                             problems, type=body_type or "InvalidRequest"))


def _problem(error: dict[str, Any]) -> Problem:
    where, *path = error["loc"] or ("body",)
    if where == "body" and not path and error["type"] == "missing":
        return Problem("a job spec is required as the JSON body")
    problem = problem_from_pydantic({**error, "loc": path})
    if where == "body":
        return problem
    return Problem(problem.message, field=f"{where}.{problem.field}" if problem.field else where)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    names = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed"}
    body = ErrorResponse(error=ErrorBody(type=names.get(exc.status_code, "HTTPError"),
                                         message=str(exc.detail)))
    return JSONResponse(body.model_dump(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


class BodySizeLimit:
    """413 for a body over `limit` bytes, declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in {"GET", "HEAD", "OPTIONS"}:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._too_large(scope, receive, send)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        error = ApiError(f"the request body is larger than {self.limit} bytes "
                         "(MERGE_SERVICE_MAX_REQUEST_BYTES)", type="PayloadTooLarge")
        response = JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)
