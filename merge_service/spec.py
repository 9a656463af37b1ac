"""The job spec (DESIGN.md section 2): one schema for YAML, JSON, the CLI and the REST API."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from merge_service.errors import Problem, SpecError, within

OutputFormat = Literal["full", "lora", "reversible", "compressed"]
OutputDtype = Literal["float32", "float16", "bfloat16"]
Space = Literal["auto", "full", "core", "knots"]

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, 1000 -> 1000."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"not a size: {value!r} (expected e.g. 5GB, 500MB, 2GiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError("size must be positive")
    return size


def _no_nul(value: str) -> str:
    if "\0" in value:  # no file system takes one; Python refuses it with a ValueError
        raise ValueError("contains a NUL character")
    return value


PathText = Annotated[str, AfterValidator(_no_nul)]  # a local path or a Hub id


class _Strict(BaseModel):
    # NaN and Infinity are no numbers a spec can mean (and JSON would store them as null)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelEntry(_Strict):
    source: PathText = Field(min_length=1,
                             description="Hub repo id[@revision] or local directory")
    weight: float = Field(1.0, description="per-model coefficient w_t")
    name: str | None = Field(None, description="task name (default: derived from source)")


class MethodSpec(_Strict):
    name: str = Field(description="a method from the catalog (`merge-service methods`)")
    params: dict[str, Any] = Field(default_factory=dict)


class OutputOptions(_Strict):
    """`output` less its destination (a schedule's template holds these)."""

    format: OutputFormat = "full"
    dtype: OutputDtype | None = Field(None, description="default: the base model's dtype, "
                                      "tensor by tensor (a float32 norm in a bfloat16 model "
                                      "stays float32)")
    private: bool = True
    create_pr: bool = False
    shard_size: str | int = "5GB"

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        parse_size(value)
        return value


class OutputSpec(OutputOptions):
    destination: PathText | None = Field(None, description="local directory or hub://org/name")

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)


class Options(_Strict):
    device: str = "auto"
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    seed: int = 0
    compute_dtype: Literal["float32", "float64"] = "float32"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return value

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, values: list[str]) -> list[str]:
        for pattern in values:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regex {pattern!r}: {exc}") from None
        return values


class CalibrationSource(_Strict):
    path: PathText
    field: str = "text"
    max_samples: int = Field(256, ge=1)


class JobSpec(_Strict):
    name: str | None = None
    base: PathText = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=2)
    method: MethodSpec
    space: Space = "auto"
    output: OutputSpec = Field(default_factory=OutputSpec)
    options: Options = Field(default_factory=Options)
    calibration: dict[str, CalibrationSource] | None = None

    @model_validator(mode="after")
    def _distinct_names(self) -> JobSpec:
        named = [m.name for m in self.models if m.name]
        duplicates = sorted({n for n in named if named.count(n) > 1})
        if duplicates:  # `revert --task` and the report name tasks: they must be unambiguous
            raise ValueError(f"task names must be distinct: {', '.join(duplicates)} repeated")
        return self

    def task_names(self) -> list[str]:
        """Each model's task name: its `name`, else the last part of its source; derived names
        get a suffix where they would collide (explicit names are kept as written)."""
        taken = {m.name for m in self.models if m.name}
        names: list[str] = []
        for entry in self.models:
            if entry.name:
                names.append(entry.name)
                continue
            stem = derive_task_name(entry.source)
            candidate, n = stem, 2
            while candidate in taken:
                candidate, n = f"{stem}-{n}", n + 1
            taken.add(candidate)
            names.append(candidate)
        return names

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def derive_task_name(source: str) -> str:
    stem = source.split("@", 1)[0].rstrip("/")
    return stem.rsplit("/", 1)[-1] or stem


def spec_from_dict(data: Any) -> JobSpec:
    """Validate a parsed document; every schema problem is reported at once. The error holds
    the spec less its unknown fields and invalid values when that much is valid (each invalid
    value then takes its default: `SpecError.partial`, with those fields in
    `SpecError.replaced`), and the problems they hid (pydantic stops at the first broken
    level: a mistyped key in the only model entry hides "a merge needs at least 2 models")."""
    if not isinstance(data, dict):
        raise SpecError(Problem("the spec must be a mapping (YAML or JSON object)"))
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
    problems = [problem_from_pydantic(err) for err in errors]
    # a field can be left out where it is a key of a mapping; a broken list item cannot
    # (the items after it would change places)
    broken = sorted({loc for loc in (value_location(err, data) for err in errors) if loc},
                    key=lambda loc: tuple(map(str, loc)))
    replaced = [".".join(map(str, loc)) for loc in broken]
    partial = None
    if broken:
        try:
            partial = JobSpec.model_validate(_without_fields(data, broken))
        except ValidationError as rest:  # what they hid, less "field required" for themselves
            problems += [p for p in map(problem_from_pydantic, rest.errors())
                         if p not in problems and not within(p.field, replaced)]
    raise SpecError(problems, partial, replaced)


def value_location(err: Any, data: Any) -> tuple[Any, ...] | None:
    """Where in `data` the value of a pydantic error is, when it is a field (a string key of a
    mapping, which can be left out): its `loc` less what pydantic adds after the value's own
    place (the union member tried: `shard_size.str`). A missing field's is its own `loc`."""
    loc = tuple(err["loc"])
    if err["type"] == "missing":
        return loc if loc and isinstance(loc[-1], str) else None
    node, parent, depth = data, None, 0
    for part in loc:
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not (in_list or (isinstance(node, dict) and part in node)):
            break
        node, parent = node[part], node
        depth += 1
    place = loc[:depth]
    return place if isinstance(parent, dict) and isinstance(place[-1], str) else None


def _without_fields(data: Any, locations: list[tuple[Any, ...]]) -> Any:
    """`data` less the fields at `locations` (paths of keys and list indexes); what holds
    none of them is shared, not copied."""
    if not locations:
        return data
    nested: dict[Any, list[tuple[Any, ...]]] = {}
    for first, *rest in locations:
        nested.setdefault(first, []).append(tuple(rest))
    if isinstance(data, dict):
        return {key: _without_fields(value, nested.get(key, [])) for key, value in data.items()
                if () not in nested.get(key, [])}
    if isinstance(data, list):
        return [_without_fields(item, nested.get(i, [])) for i, item in enumerate(data)]
    return data


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML or JSON spec file (JSON is YAML, but a .json file gets JSON's error messages)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(Problem(f"spec file not found: {path}")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(Problem(f"cannot read spec file {path}: {exc}")) from None
    return parse_spec_text(text, json_only=path.suffix.lower() == ".json")


def parse_spec_text(text: str, json_only: bool = False) -> JobSpec:
    """A key given twice in one mapping is an error, as an unknown field is: YAML and JSON
    parsers would keep the last one silently."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if json_only \
            else yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except json.JSONDecodeError as exc:
        raise SpecError(Problem(f"the spec is not valid JSON: {exc}")) from None
    except _DuplicateKey as exc:
        raise SpecError(Problem(f"the spec is not valid JSON: {exc}")) from None
    except yaml.YAMLError as exc:
        raise SpecError(Problem(f"the spec is not valid YAML: {_yaml_error(exc)}")) from None
    except RecursionError:  # the parsers recurse once per level
        raise SpecError(Problem("the spec is nested too deeply")) from None
    return spec_from_dict(data)


class _DuplicateKey(ValueError):
    pass


def duplicate_key_problem(text: str | bytes) -> Problem | None:
    """The key a JSON document gives twice in one object, as a problem (None: none, or not
    JSON at all, which the caller's own parser reports)."""
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        return Problem(str(exc))
    except (ValueError, RecursionError):
        return None
    return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"the key {key!r} is given twice in one object")
        seen[key] = value
    return seen


# More values than any real spec holds: YAML aliases can make a short text expand to billions
# ("billion laughs"), which every later step (validation, storing, the line index) would walk.
MAX_SPEC_VALUES = 100_000


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document that expands (aliases followed) to more than MAX_SPEC_VALUES nodes,
    or that holds itself through an alias. Each node is sized once: linear in the text."""
    sizes: dict[int, int] = {}
    walking: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in walking:
            raise yaml.constructor.ConstructorError(
                None, None, "a YAML alias refers to a value that contains it", node.start_mark)
        walking.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        walking.discard(key)
        if total > MAX_SPEC_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"the spec expands to more than {MAX_SPEC_VALUES} values "
                "(YAML aliases)", node.start_mark)
        sizes[key] = total
        return total

    size(root)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """`line L, column C: problem (context)`, one line (PyYAML's own text spans several and
    quotes the input)."""
    mark = getattr(exc, "problem_mark", None)
    if not isinstance(exc, yaml.MarkedYAMLError) or mark is None:
        return " ".join(str(exc).split())
    context = f" ({exc.context})" if exc.context else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}"


def problem_from_pydantic(err: Any) -> Problem:
    """A pydantic error of a spec (or of a request body that holds one) as a problem."""
    location = ".".join(str(part) for part in err["loc"])
    message = err["msg"]
    if err["type"] == "value_error":  # our validators' own text, without pydantic's prefix
        message = message.removeprefix("Value error, ")
    elif err["type"] == "extra_forbidden":
        message = "unknown field"
    elif err["type"] == "too_short" and location == "models":
        message = "a merge needs at least 2 models"
    return Problem(message, field=location or None)
