"""What every method of METHODS.md sections 3-9 shares: registration, catalog, validation."""

from __future__ import annotations

import pytest
import torch

from merge_service.methods import available, build_method, catalog
from merge_service.methods.base import DEFAULT_SVD_EXCLUDE
from tests.methods.helpers import generator, make_task, method, randn

# METHODS.md: name -> {param: default}; the SVD methods also take `svd_exclude`
EXPECTED = {
    "ties": ({"density": 0.2, "alpha": 1.0}, False),
    "dare_linear": ({"density": 0.5, "alpha": 1.0}, False),
    "dare_ties": ({"density": 0.5, "alpha": 1.0}, False),
    "tsv": ({"alpha": 1.0}, True),
    "tsv_compress": ({"rank_fraction": None}, True),
    "iso_c": ({"alpha": 1.0}, True),
    "iso_cts": ({"alpha": 1.0, "common_fraction": 0.8}, True),
    "cart": ({"rank_fraction": 0.12, "alpha": 2.0}, True),
}
DELTA_METHODS = [name for name in EXPECTED if name != "tsv_compress"]


@pytest.mark.parametrize("name", EXPECTED)
def test_registered_and_catalogued_with_the_defaults_of_methods_md(name: str) -> None:
    assert name in available()
    entry = next(e for e in catalog() if e["name"] == name)
    defaults, svd = EXPECTED[name]
    listed = {key: p["default"] for key, p in entry["params"].items()}
    if svd:
        # a default_factory has no JSON-schema default: check the params model itself
        assert listed.pop("svd_exclude") in (None, list(DEFAULT_SVD_EXCLUDE))
        assert available()[name].Params().svd_exclude == list(DEFAULT_SVD_EXCLUDE)
    assert listed == defaults
    assert entry["summary"] and "\n" not in entry["summary"]
    assert all(p["description"] for p in entry["params"].values())


@pytest.mark.parametrize("name", EXPECTED)
def test_unknown_param_is_rejected(name: str) -> None:
    built, problems = build_method(name, {"alhpa": 1.0})
    assert built is None
    assert [(p.field, p.message.split(" (")[0]) for p in problems] == [
        ("method.params.alhpa", "unknown parameter")]


@pytest.mark.parametrize(("name", "param", "value"), [
    ("ties", "density", 0.0), ("ties", "density", 1.5),
    ("dare_linear", "density", 0.0), ("dare_ties", "density", -0.1),
    ("tsv_compress", "rank_fraction", 0.0), ("tsv_compress", "rank_fraction", 1.01),
    ("iso_cts", "common_fraction", 1.2), ("cart", "rank_fraction", 0.0),
])
def test_meaningless_values_are_rejected(name: str, param: str, value: float) -> None:
    built, problems = build_method(name, {param: value})
    assert built is None
    assert [p.field for p in problems] == [f"method.params.{param}"]


def _float_params() -> list[tuple[str, str]]:
    return [(name, field) for name, cls in sorted(available().items())
            for field, info in cls.Params.model_fields.items()
            if info.annotation in (float, float | None)]


@pytest.mark.parametrize(("name", "param"), _float_params())
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused_for_every_float_param(name: str, param: str,
                                                            value: float) -> None:
    """A merge with them writes no usable model (and JSON would store them as null)."""
    built, problems = build_method(name, {param: value})
    assert built is None
    assert [(p.field, p.message.split(" (")[0]) for p in problems] == [
        (f"method.params.{param}", "Input should be a finite number")]


def test_every_method_with_parameters_has_a_float_param_checked() -> None:
    assert {name for name, _ in _float_params()} == set(available()) - {"average"}


@pytest.mark.parametrize("name", DELTA_METHODS)
@pytest.mark.parametrize("shape", [(7, 5), (5,), (2, 3, 4), ()])
def test_shape_and_float64_preserved(name: str, shape: tuple[int, ...]) -> None:
    gen = generator(1)
    task = make_task([randn(gen, *shape) for _ in range(3)], weights=[1.0, 0.5, 2.0])
    delta = method(name).merge(task).delta
    assert delta is not None
    assert delta.shape == torch.Size(shape)
    assert delta.dtype == torch.float64
    assert torch.isfinite(delta).all()


@pytest.mark.parametrize("name", DELTA_METHODS)
def test_all_zero_task_vectors_give_a_zero_delta(name: str) -> None:
    task = make_task([torch.zeros(6, 4, dtype=torch.float64) for _ in range(2)])
    delta = method(name).merge(task).delta
    assert delta is not None
    assert torch.equal(delta, torch.zeros(6, 4, dtype=torch.float64))


@pytest.mark.parametrize("name", EXPECTED)
def test_diagnostics_are_json_numbers(name: str) -> None:
    import json

    gen = generator(2)
    task = make_task([randn(gen, 6, 4) for _ in range(2)])
    method(name).merge(task)
    json.dumps(task.diagnostics)

    def plain(value: object) -> bool:
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (int, float)

    assert all(plain(v) for v in task.diagnostics.values()), task.diagnostics
