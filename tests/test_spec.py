"""The job spec (DESIGN.md section 2): one schema for YAML and JSON, strict, with defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from merge_service import spec as spec_module
from merge_service.errors import Problem, SpecError
from merge_service.spec import (
    JobSpec,
    derive_task_name,
    load_spec,
    parse_size,
    parse_spec_text,
    spec_from_dict,
)
from tests.conftest import write_spec

FULL: dict[str, Any] = {
    "name": "support-bot-merge",
    "base": "meta-llama/Llama-3.2-1B",
    "models": [
        {"source": "org/lora-math@3f2a1c0", "weight": 0.5, "name": "math"},
        {"source": "./adapters/code"},
    ],
    "method": {"name": "tsv", "params": {"alpha": 1.0}},
    "space": "full",
    "output": {"format": "full", "destination": "./out/merged", "dtype": "bfloat16",
               "private": False, "create_pr": True, "shard_size": "2GB"},
    "options": {"device": "cpu", "include": ["layers\\.[0-3]\\."], "exclude": ["lm_head"],
                "seed": 42, "compute_dtype": "float64"},
    "calibration": {"math": {"path": "./calib/math.jsonl", "field": "question",
                             "max_samples": 64}},
}
MINIMAL: dict[str, Any] = {"base": "org/base", "models": [{"source": "org/a"}, {"source": "b"}],
                           "method": {"name": "task_arithmetic"}}


def problems_of(data: Any) -> list[Problem]:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    return info.value.problems


def with_field(path: str, value: Any, data: dict[str, Any] = FULL) -> dict[str, Any]:
    """A deep copy of `data` with `value` set at the dotted `path` (list indices allowed)."""
    out = json.loads(json.dumps(data))
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def test_yaml_and_json_files_parse_identically(tmp_path: Path) -> None:
    from_yaml = load_spec(write_spec(tmp_path, "spec.yaml", **FULL))
    from_json = load_spec(write_spec(tmp_path, "spec.json", **FULL))
    assert from_yaml == from_json
    assert from_yaml.model_dump() == from_json.model_dump()
    assert from_yaml.models[0].weight == 0.5
    assert from_yaml.options.include == ["layers\\.[0-3]\\."]
    assert from_yaml.calibration is not None
    assert from_yaml.calibration["math"].max_samples == 64


def test_json_text_is_also_accepted_by_the_yaml_reader() -> None:
    assert parse_spec_text(json.dumps(FULL)) == parse_spec_text(json.dumps(FULL), json_only=True)


@pytest.mark.parametrize(("text", "json_only", "expected"), [
    ("base: b\nmethod: {name: ties}\nmethod: {name: task_arithmetic}\n", False,
     "line 3, column 1: the key 'method' is given twice in one mapping"),
    ("base: b\noptions: {seed: 1, seed: 2}\n", False, "the key 'seed' is given twice"),
    ('{"base": "b", "base": "c"}', True, "JSON: the key 'base' is given twice in one object"),
])
def test_a_key_given_twice_is_an_error(text: str, json_only: bool, expected: str) -> None:
    """A second `method:` must not silently replace the first (the parsers keep the last)."""
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, json_only=json_only)
    assert expected in info.value.problems[0].message


def test_yaml_merge_keys_are_still_read() -> None:
    text = "defaults: &d {seed: 3}\nbase: b\noptions: {<<: *d}\n"
    data = yaml.load(text, Loader=spec_module._UniqueKeyLoader)
    assert data["options"] == {"seed": 3}


def test_to_yaml_round_trips() -> None:
    spec = spec_from_dict(FULL)
    again = parse_spec_text(spec.to_yaml())
    assert again == spec
    assert yaml.safe_load(spec.to_yaml())["output"]["shard_size"] == "2GB"


@pytest.mark.parametrize("path", [
    "typo", "models.1.wieght", "method.parms", "output.fromat", "options.devcie",
    "calibration.math.pth",
])
def test_unknown_fields_are_rejected_with_their_path(path: str) -> None:
    data = json.loads(json.dumps(FULL))
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = 1
    problems = problems_of(data)
    assert [(p.field, p.message) for p in problems] == [(path, "unknown field")]
    assert path in str(SpecError(problems))


def test_every_unknown_field_is_reported_at_once() -> None:
    data = json.loads(json.dumps(FULL))
    data["nmae"] = "x"
    data["models"][0]["wieght"] = 2
    data["output"]["sharding"] = "1GB"
    data["options"]["sed"] = 1
    fields = {p.field for p in problems_of(data)}
    assert fields == {"nmae", "models.0.wieght", "output.sharding", "options.sed"}


def test_the_rest_of_a_spec_with_unknown_fields_is_kept_for_preflight() -> None:
    """The spec less its unknown fields is valid: preflight can still check it, so a typo does
    not hide every other problem until it is fixed."""
    data = json.loads(json.dumps(FULL))
    data["models"][0]["wieght"] = 2
    data["outptu"] = {}
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    assert info.value.partial == spec_from_dict(FULL)
    data["base"] = 7  # a required field left out: no partial spec, and no "field required"
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    assert info.value.partial is None
    assert {p.field for p in info.value.problems} == {"models.0.wieght", "outptu", "base"}


def test_invalid_values_take_their_defaults_in_the_partial_spec() -> None:
    """An invalid value hides no more than a typo does: preflight checks the rest with the
    field's default in its place, and `replaced` names it so that what preflight says of
    the default is not reported."""
    data = json.loads(json.dumps(FULL))
    data["output"]["dtype"] = "float99"
    data["options"]["device"] = "gpu"
    data["models"][1]["weight"] = "heavy"
    data["models"][0]["wieght"] = 2
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    error = info.value
    assert {p.field for p in error.problems} == {
        "output.dtype", "options.device", "models.1.weight", "models.0.wieght"}
    assert sorted(error.replaced) == ["models.0.wieght", "models.1.weight", "options.device",
                                      "output.dtype"]
    defaults = json.loads(json.dumps(FULL))
    del defaults["output"]["dtype"], defaults["options"]["device"]
    assert error.partial == spec_from_dict(defaults)
    assert (error.partial.output.dtype, error.partial.options.device,
            error.partial.models[1].weight) == (None, "auto", 1.0)
    # preflight's word on a field left out is about its default: dropped; the rest is kept
    merged = error.with_problems_of_partial([Problem("x", field="output.dtype"),
                                             Problem("y", field="options.device.index"),
                                             Problem("missing", model="a")])
    assert [p.message for p in merged.problems][-1] == "missing"
    assert len(merged.problems) == len(error.problems) + 1


def test_a_value_of_no_member_of_a_union_is_left_out() -> None:
    """pydantic places the error of a `str | int` value at each member it tried
    (`output.shard_size.str`, `.int`): the value itself is left out, as any invalid one."""
    data = json.loads(json.dumps(FULL))
    data["output"]["shard_size"] = 1.5
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    assert info.value.replaced == ["output.shard_size"]
    defaults = json.loads(json.dumps(FULL))
    del defaults["output"]["shard_size"]
    assert info.value.partial == spec_from_dict(defaults)


def test_a_problem_about_a_field_left_out_is_dropped_where_it_is_reported() -> None:
    """A preflight problem reported at one field but about another (`also`) that was left
    out is about that field's default: dropped too. `also` is no part of what is shown."""
    data = json.loads(json.dumps(FULL))
    data["output"]["format"] = "loar"
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    about_format = Problem("target_rank truncates the 'lora' output; the output format is "
                           "'full'", field="method.params.target_rank", also=("output.format",))
    kept = Problem("regex matches nothing", field="options.include", also=("models.0.weight",))
    merged = info.value.with_problems_of_partial([about_format, kept])
    assert merged.problems == [*info.value.problems, kept]
    assert kept.to_dict() == {"message": "regex matches nothing", "model": None, "tensor": None,
                              "field": "options.include"}


def test_a_broken_list_item_is_not_left_out() -> None:
    """Leaving out a list item would move the items after it: no partial spec."""
    data = json.loads(json.dumps(FULL))
    data["models"][0] = "org/a"
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    assert info.value.partial is None and info.value.replaced == []


def test_what_an_unknown_field_hid_is_reported_with_it() -> None:
    """pydantic stops at a broken list item: the list's own length problem comes back once
    the unknown field is left out."""
    data = {**MINIMAL, "models": [{"source": "org/a", "wieght": 2}]}
    assert [(p.field, p.message) for p in problems_of(data)] == [
        ("models.0.wieght", "unknown field"), ("models", "a merge needs at least 2 models")]


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_nan_and_infinity_are_no_weights(text: str) -> None:
    """JSON would store them as null; method parameters are refused the same way by the
    method's parameter model (tests/methods)."""
    spec = f"base: org/base\nmethod: {{name: ties}}\nmodels: [{{source: a, weight: {text}}}, " \
           "{source: b}]\n"
    with pytest.raises(SpecError) as info:
        parse_spec_text(spec)
    assert [(p.field, p.message) for p in info.value.problems] == [
        ("models.0.weight", "Input should be a finite number")]


def test_a_yaml_alias_bomb_is_refused_at_once() -> None:
    """Ten levels of ten aliases: 10**10 values from 600 bytes of text."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    text = "\n".join(lines) + "\nbase: *l9\n"
    with pytest.raises(SpecError, match=r"expands to more than 100000 values \(YAML aliases\)"):
        parse_spec_text(text)
    with pytest.raises(SpecError, match="alias refers to a value that contains it"):
        parse_spec_text("base: &a [x, *a]\n")
    # aliases within reason are YAML as usual
    spec = parse_spec_text("base: org/base\nmethod: {name: ties, params: {alpha: &w 0.5}}\n"
                           "models: [{source: a, weight: *w}, {source: b, weight: *w}]\n")
    assert [m.weight for m in spec.models] == [0.5, 0.5]


@pytest.mark.parametrize("json_only", [True, False])
def test_deep_nesting_is_a_spec_error(json_only: bool) -> None:
    text = '{"base": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(SpecError, match="nested too deeply"):
        parse_spec_text(text, json_only=json_only)


def test_method_params_are_free_form_here() -> None:
    """Params belong to the method and are checked at preflight (against its typed model)."""
    spec = spec_from_dict(with_field("method.params", {"anything": [1, 2]}))
    assert spec.method.params == {"anything": [1, 2]}


@pytest.mark.parametrize("models", [[], [{"source": "org/a"}]])
def test_fewer_than_two_models(models: list) -> None:
    problems = problems_of({**MINIMAL, "models": models})
    assert [(p.field, p.message) for p in problems] == [("models",
                                                         "a merge needs at least 2 models")]


@pytest.mark.parametrize("value", ["5XB", "0", 0, -1, "abc", "1.5.2GB", "GB", ""])
def test_bad_shard_size(value: Any) -> None:
    problems = problems_of(with_field("output.shard_size", value))
    assert [p.field for p in problems] == ["output.shard_size"]


@pytest.mark.parametrize(("value", "expected"), [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20),
    ("1.5GB", 1_500_000_000), ("20kb", 20_000), (" 7 B ", 7), ("1000", 1000), (1000, 1000),
])
def test_sizes(value: str | int, expected: int) -> None:
    assert parse_size(value) == expected
    spec = spec_from_dict(with_field("output.shard_size", value))
    assert spec.output.shard_bytes == expected


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:0:1", "mps", ""])
def test_bad_device(value: str) -> None:
    problems = problems_of(with_field("options.device", value))
    assert [p.field for p in problems] == ["options.device"]
    assert "auto, cpu, cuda or cuda:N" in problems[0].message


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices(value: str) -> None:
    assert spec_from_dict(with_field("options.device", value)).options.device == value


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_bad_regex(key: str) -> None:
    problems = problems_of(with_field(f"options.{key}", ["ok", "layers.(["]))
    assert [p.field for p in problems] == [f"options.{key}"]
    assert "layers.([" in problems[0].message


@pytest.mark.parametrize(("path", "value"), [
    ("space", "diagonal"), ("output.format", "gguf"), ("output.dtype", "float64"),
    ("options.compute_dtype", "bfloat16"), ("models.0.weight", "heavy"), ("base", ""),
    ("models.0.source", ""), ("calibration.math.max_samples", 0), ("options.seed", "zero"),
])
def test_bad_values_name_their_field(path: str, value: Any) -> None:
    problems = problems_of(with_field(path, value))
    assert [p.field for p in problems] == [path]


def test_missing_required_fields() -> None:
    fields = {p.field for p in problems_of({"models": [{"weight": 1}, {"source": "x"}]})}
    assert fields == {"base", "method", "models.0.source"}


@pytest.mark.parametrize("data", [[1, 2], "base: x", None, 3])
def test_the_document_must_be_a_mapping(data: Any) -> None:
    assert "mapping" in problems_of(data)[0].message


def test_unparsable_files(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("base: [unclosed\n")
    with pytest.raises(SpecError, match=r"not valid YAML: line 2, column 1: expected ',' or "
                       r"'\]', but got '<stream end>' \(while parsing a flow sequence\)$"):
        load_spec(bad_yaml)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("base: org/x\n")  # YAML, but the .json suffix asks for JSON
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(bad_json)
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "absent.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(binary)


def test_defaults() -> None:
    spec = spec_from_dict(MINIMAL)
    assert spec.name is None
    assert spec.space == "auto"
    assert spec.method.params == {}
    assert [m.weight for m in spec.models] == [1.0, 1.0]
    assert [m.name for m in spec.models] == [None, None]
    out = spec.output
    assert (out.format, out.destination, out.dtype, out.private, out.create_pr) == \
        ("full", None, None, True, False)
    assert out.shard_size == "5GB" and out.shard_bytes == 5 * 10**9
    opts = spec.options
    assert (opts.device, opts.include, opts.exclude, opts.seed, opts.compute_dtype) == \
        ("auto", [], [], 0, "float32")
    assert spec.calibration is None


def test_the_spec_is_immutable() -> None:
    spec = spec_from_dict(MINIMAL)
    with pytest.raises(ValueError):
        spec.base = "other"  # type: ignore[misc]


@pytest.mark.parametrize(("source", "expected"), [
    ("org/lora-math@3f2a1c0", "lora-math"), ("org/lora-math", "lora-math"),
    ("./adapters/code", "code"), ("./adapters/code/", "code"), ("/abs/path/to/model", "model"),
    ("gpt2", "gpt2"), ("org/name@refs/pr/1", "name"),
])
def test_task_name_derivation(source: str, expected: str) -> None:
    assert derive_task_name(source) == expected


def test_task_names_explicit_and_derived() -> None:
    spec = spec_from_dict({**MINIMAL, "models": [{"source": "org/lora-math@abc", "name": "m"},
                                                 {"source": "./adapters/code"}]})
    assert spec.task_names() == ["m", "code"]


def test_task_names_are_made_unique() -> None:
    models = [{"source": "a/x"}, {"source": "b/x"}, {"source": "c/x@v2"}, {"source": "y",
                                                                           "name": "x"}]
    names = spec_from_dict({**MINIMAL, "models": models}).task_names()
    assert names == ["x-2", "x-3", "x-4", "x"]  # the explicit name is kept as written


def test_repeated_explicit_names_are_rejected() -> None:
    models = [{"source": "a/x", "name": "math"}, {"source": "b/y", "name": "math"}]
    with pytest.raises(SpecError, match="math repeated"):
        spec_from_dict({**MINIMAL, "models": models})


def test_a_derived_name_never_collides_with_a_suffixed_one() -> None:
    models = [{"source": "a/x"}, {"source": "b/x"}, {"source": "c", "name": "x-2"}]
    names = spec_from_dict({**MINIMAL, "models": models}).task_names()
    assert names == ["x", "x-3", "x-2"]


def test_schema_is_the_same_object_for_yaml_json_and_dicts(tmp_path: Path) -> None:
    assert isinstance(spec_from_dict(MINIMAL), JobSpec)
    assert load_spec(write_spec(tmp_path, "m.yml", **MINIMAL)) == spec_from_dict(MINIMAL)
