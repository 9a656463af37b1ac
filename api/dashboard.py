"""The dashboard (DESIGN.md section 1: "REST client / dashboard"), served by the API at `/`.

Pages are server-rendered Jinja2 templates that carry no job data: the browser fetches
everything from the REST API with the key the user entered (kept in `sessionStorage`, sent as
`Authorization: Bearer`), so the pages themselves need no authentication and the dashboard
can do nothing a REST client with the same key could not.

- `/`: the jobs, a live list following `GET /v1/events` (every job's events, one stream).
- `/jobs/{id}`: one job, live through its Server-Sent Events (read with `fetch`, since
  `EventSource` cannot send an `Authorization` header), and its merge report as charts.
- `/new`: the spec editor; "Check" runs `POST /v1/jobs:validate` (schema and preflight).
- `/schedules`: scheduled merges (`/v1/schedules`).

Static files (CSS, JavaScript) come from `api/static/`, written by hand, no CDN or build step,
so the dashboard works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from api.validate import router as validate_router
from merge_service import __version__

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
# the whole dashboard runs from its own origin: no inline script, no third-party anything
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_MEDIA = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}

router = APIRouter()
router.include_router(validate_router)  # the spec editor's check; documented in OpenAPI


def _page(request: Request, template: str, title: str, **context: object) -> HTMLResponse:
    response = templates.TemplateResponse(request, template, {
        "title": title, "version": __version__,
        "auth_required": bool(request.app.state.api_keys),
        "has_schedules": _has_schedules(request), **context})
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


def _has_schedules(request: Request) -> bool:
    return "/v1/schedules" in request.app.openapi()["paths"]  # built once, then cached


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def jobs_page(request: Request) -> HTMLResponse:
    return _page(request, "jobs.html", "Jobs", page="jobs")


@router.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
def job_page(request: Request,
             job_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{20}$")]) -> HTMLResponse:
    return _page(request, "job.html", f"Job {job_id}", page="job", job_id=job_id)


@router.get("/new", response_class=HTMLResponse, include_in_schema=False)
def new_page(request: Request) -> HTMLResponse:
    return _page(request, "new.html", "New merge", page="new")


@router.get("/schedules", response_class=HTMLResponse, include_in_schema=False)
def schedules_page(request: Request) -> HTMLResponse:
    if not _has_schedules(request):
        raise HTTPException(404, "this server has no schedules API")
    return _page(request, "schedules.html", "Schedules", page="schedules")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    path = STATIC_DIR / name
    # a flat directory: a name with a separator or a dot-file is never one of ours
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(path, media_type=_MEDIA.get(path.suffix, "application/octet-stream"),
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
