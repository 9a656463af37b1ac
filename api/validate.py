"""`POST /v1/jobs:validate`: the checks of `POST /v1/jobs` (schema, then preflight) without
queueing anything, on a spec sent as YAML or JSON.

The dashboard's spec editor uses it: the browser holds YAML text and has no YAML parser, so the
server parses it, reports every problem with the line of the spec it is about, and returns the
spec as JSON for `POST /v1/jobs`. The answer is 200 whether the spec is valid or not (the
request itself succeeded); `valid` says which.
"""

from __future__ import annotations

from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, require
from api.errors import ERROR_RESPONSES, BadRequest, Invalid, ProblemModel
from merge_service.errors import Problem, SpecError
from merge_service.spec import JobSpec, parse_spec_text

router = APIRouter(responses=ERROR_RESPONSES)
Submitter = Annotated[Principal, require("submit")]
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml",
               "text/plain")


class LocatedProblem(ProblemModel):
    line: int | None = Field(None, description="1-based line of the spec text the problem is "
                                               "about, when it can be located")


class Validation(BaseModel):
    valid: bool
    problems: list[LocatedProblem] = Field(default_factory=list)
    spec: dict[str, Any] | None = Field(None, description="the spec as parsed (JSON), ready "
                                                          "for POST /v1/jobs; null if it does "
                                                          "not parse")
    resolved: dict[str, Any] | None = Field(None, description="the spec a job would store: "
                                                              "revisions pinned, paths "
                                                              "absolute; null if invalid")


@router.post("/v1/jobs:validate", response_model=Validation, tags=["jobs"],
             summary="Check a spec (YAML or JSON) as POST /v1/jobs would, queue nothing",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/yaml": {"schema": {"type": "string"}},
                 "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}}})
async def validate_job(request: Request, principal: Submitter) -> Validation:
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the spec must be UTF-8 text") from None
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in (*_YAML_TYPES, "application/json"):
        raise BadRequest("send the spec as application/yaml or application/json")
    service = request.app.state.service
    return await run_in_threadpool(validate_text, service, text, media_type == "application/json")


def validate_text(service: Any, text: str, json_only: bool) -> Validation:
    """Parse, then preflight (`JobService.preflight`, exactly what submitting runs)."""
    lines = _LineIndex(text)
    try:
        spec = parse_spec_text(text, json_only=json_only)
    except SpecError as exc:
        return Validation(valid=False, problems=[lines.locate(p, exc.partial)
                                                 for p in service.every_problem(exc)])
    as_json = spec.model_dump(mode="json", exclude_unset=True)
    try:
        resolved = service.preflight(spec)
    except Invalid as exc:
        return Validation(valid=False, spec=as_json,
                          problems=[lines.locate(p, spec) for p in exc.problems])
    return Validation(valid=True, spec=as_json, resolved=resolved.model_dump(mode="json"))


class _LineIndex:
    """Where each field of a YAML (or JSON) document starts: dotted path -> 1-based line."""

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        self._seen: set[int] = set()
        self.error_line: int | None = None  # of a syntax error (the text's last at its end)
        try:
            root = yaml.compose(text)
            if root is not None:
                self._walk(root, "")
        except (yaml.YAMLError, RecursionError) as exc:  # the parser reports these
            self.lines.clear()
            mark = getattr(exc, "problem_mark", None)
            if isinstance(exc, yaml.MarkedYAMLError) and mark is not None:
                self.error_line = min(mark.line + 1, max(1, len(text.splitlines())))

    def _walk(self, node: yaml.Node, path: str) -> None:
        # a node an alias repeats is written once: walked once (its first path), so that a
        # short text of nested aliases costs what its text does, not what it expands to
        if id(node) in self._seen:
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = f"{path}.{key.value}" if path else str(key.value)
                self.lines[child] = key.start_mark.line + 1
                self._walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                child = f"{path}.{i}"
                self.lines[child] = item.start_mark.line + 1
                self._walk(item, child)

    def locate(self, problem: Problem, spec: JobSpec | None = None) -> LocatedProblem:
        line = None
        field = problem.field
        while field and line is None:  # the field, else its nearest written parent
            line = self.lines.get(field)
            field = field.rpartition(".")[0]
        if line is None and problem.model and spec is not None:
            line = self._model_line(problem.model, spec)
        if line is None and problem.field is None and problem.model is None:
            line = self.error_line  # the text is not YAML: its one problem says where
        return LocatedProblem(**problem.to_dict(), line=line)

    def _model_line(self, model: str, spec: JobSpec) -> int | None:
        if model in ("base", "output", "method", "calibration", "options"):
            return self.lines.get(model)
        for i, (entry, name) in enumerate(zip(spec.models, spec.task_names(), strict=True)):
            if model in (name, entry.source):
                return self.lines.get(f"models.{i}")
        return None

