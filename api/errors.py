"""Errors the API answers with, all in one shape: `{"error": {type, message, problems}}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from merge_service.errors import Problem


class ProblemModel(BaseModel):
    message: str
    model: str | None = Field(None, description="the source the problem is about (or base, "
                                                 "output, method)")
    tensor: str | None = None
    field: str | None = Field(None, description="dotted path into the spec")


class ErrorBody(BaseModel):
    type: str = Field(description="e.g. PreflightError, NotFound, Unauthorized")
    message: str
    problems: list[ProblemModel] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """Raised by services and dependencies; answered as `ErrorResponse` with `status`."""

    status = 500
    type = "InternalError"

    def __init__(self, message: str, problems: list[Problem] | None = None, *,
                 type: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems or []
        self.headers = dict(headers or {})
        if type is not None:
            self.type = type

    def body(self) -> dict:
        return ErrorResponse(error=ErrorBody(
            type=self.type, message=self.message,
            problems=[ProblemModel(**p.to_dict()) for p in self.problems])).model_dump()


class BadRequest(ApiError):
    status, type = 400, "BadRequest"


class Unauthorized(ApiError):
    status, type = 401, "Unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status, type = 403, "Forbidden"


class NotFound(ApiError):
    status, type = 404, "NotFound"


class Conflict(ApiError):
    status, type = 409, "Conflict"


class Invalid(ApiError):
    """422: the spec or its inputs are wrong; `problems` lists every one."""

    status, type = 422, "InvalidInput"


class Unavailable(ApiError):
    status, type = 503, "Unavailable"


# for the OpenAPI document: what each error status looks like
OpenApiResponses = dict[int | str, dict[str, Any]]


def error_response(status: int, description: str) -> OpenApiResponses:
    """One error status of an endpoint, in the common shape, for `responses=`."""
    return {status: {"model": ErrorResponse, "description": description}}


ERROR_RESPONSES: OpenApiResponses = {
    **error_response(400, "malformed request"),
    **error_response(401, "missing or unknown key"),
    **error_response(403, "the key's role does not allow this"),
    **error_response(413, "request body too large"),
    **error_response(422, "invalid parameters or body: every problem"),
    **error_response(503, "the job store (Redis) is unavailable: try again shortly"),
}
