"""`GET /docs`: Swagger UI on the API's OpenAPI document, served from this package.

FastAPI's own `/docs` loads Swagger UI from a CDN, which a machine without internet cannot
reach. `api/vendor/swagger-ui/` holds the two files it needs from the npm package
`swagger-ui-dist` (5.35.0, Apache-2.0, its LICENSE and NOTICE beside them; version 5 because
FastAPI writes OpenAPI 3.1). The page starts it with `api/static/api-docs.js`: no inline
script, so the page carries a Content-Security-Policy like the dashboard's.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException

VENDOR_DIR = Path(__file__).parent / "vendor" / "swagger-ui"
SWAGGER_UI_VERSION = "5.35.0"
# Swagger UI sets style attributes as it renders, hence 'unsafe-inline' for styles only
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'")
_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
           "favicon-32x32.png": "image/png"}
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API</title>
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css?v={version}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi_url}"></div>
<script src="/docs/assets/swagger-ui-bundle.js?v={version}"></script>
<script src="/static/api-docs.js"></script>
</body>
</html>
"""

router = APIRouter(include_in_schema=False)


@router.get("/docs", response_class=HTMLResponse)
def api_docs(request: Request) -> HTMLResponse:
    app = request.app
    page = _PAGE.format(title=app.title, version=SWAGGER_UI_VERSION,
                        openapi_url=app.openapi_url)
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP,
                                       "X-Content-Type-Options": "nosniff"})


@router.get("/docs/assets/{name}")
def api_docs_asset(name: str) -> FileResponse:
    if name not in _ASSETS:
        raise HTTPException(404, f"no such asset {name!r}")
    return FileResponse(VENDOR_DIR / name, media_type=_ASSETS[name],
                        headers={"Cache-Control": "public, max-age=86400",
                                 "X-Content-Type-Options": "nosniff"})
