"""The method registry: each method is one module that registers its class by name."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from pydantic import ValidationError

from merge_service.errors import Problem
from merge_service.methods.base import (
    MergeMethod,
    MethodParams,
    SumOfTerms,
    TensorResult,
    TensorTask,
    WholeModelMethod,
)

_REGISTRY: dict[str, type[MergeMethod]] = {}
_loaded = False
_NOT_METHOD_MODULES = {"base", "linalg"}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available under `cls.name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, type[MergeMethod]]:
    global _loaded
    if not _loaded:  # import every method module once; each registers itself
        for module in pkgutil.iter_modules(__path__):
            if module.name not in _NOT_METHOD_MODULES:
                importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[MergeMethod] | None:
    return available().get(name)


def build_method(name: str, params: dict[str, Any]) -> tuple[MergeMethod | None, list[Problem]]:
    """Instantiate a method with validated params, or return every problem found."""
    cls = get_method_class(name)
    if cls is None:
        known = ", ".join(available())
        return None, [Problem(f"unknown method {name!r} (known: {known})", field="method.name")]
    try:
        parsed = cls.Params.model_validate(params)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(Problem(f"{msg} (method {name})", field=f"method.params.{loc}"))
        return None, problems
    return cls(parsed), []


def catalog() -> list[dict[str, Any]]:
    """The catalog shown by `merge-service methods` and `GET /v1/methods`."""
    entries = []
    for name, cls in available().items():
        schema = cls.Params.model_json_schema()
        fields = cls.Params.model_fields
        params = {
            key: {
                "type": prop.get("type", prop.get("anyOf", "any")),
                "default": fields[key].get_default(call_default_factory=True),
                "description": prop.get("description", ""),
                **{k: prop[k] for k in ("minimum", "maximum", "exclusiveMinimum",
                                        "exclusiveMaximum", "enum") if k in prop},
            }
            for key, prop in schema.get("properties", {}).items()
        }
        entries.append({
            "name": name,
            "summary": cls.summary,
            "output_formats": sorted(cls.output_formats),
            "spaces": sorted(cls.spaces),
            "weights": cls.uses_weights,
            "params": params,
        })
    return entries


__all__ = [
    "MergeMethod", "MethodParams", "SumOfTerms", "TensorResult", "TensorTask",
    "WholeModelMethod", "available", "build_method", "catalog", "get_method_class", "register",
]
