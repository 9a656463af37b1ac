"""Merges of real MiniLM fine-tunes, loaded back with `transformers` and run on real text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from merge_service.engine import run_merge
from merge_service.methods import WholeModelMethod, available
from merge_service.spec import spec_from_dict
from tests.conftest import (
    FineTune,
    job,
    last_hidden_states,
    offline,
    read_tensors,
    relative_error,
)

pytestmark = pytest.mark.usefixtures("hf_offline")

# Methods whose output is a merged model (`full`); artifact-only methods are tested elsewhere,
# task_arithmetic and average run on the whole model in their own tests below.
FULL_METHODS = sorted(name for name, cls in available().items()
                      if cls.produces_delta and "full" in cls.output_formats
                      and name not in {"task_arithmetic", "average"}
                      # adarank needs calibration data: tests/test_adarank_models.py
                      and not issubclass(cls, WholeModelMethod))
# The sweep merges square and non-square matrices, biases and a layer norm of layer 0 (the
# rest stays as in the base): enough for every rule of every method, and fast.
SWEEP_INCLUDE = [r"encoder\.layer\.0\.attention\.self\.(query|value)\.weight",
                 r"encoder\.layer\.0\.output\.", r"^pooler\.dense\.bias"]


def embed(model_dir: Path, tokenizer_dir: Path) -> torch.Tensor:
    """Mean-pooled last hidden states of `TEXTS`, after checking the raw outputs."""
    hidden, attention_mask = last_hidden_states(model_dir, tokenizer_dir)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def base_embeddings(minilm_dir: Path) -> torch.Tensor:
    with offline():
        return embed(minilm_dir, minilm_dir)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_finetunes_are_real_loadable_models(minilm_dir: Path, minilm_finetunes: list[FineTune],
                                            minilm_tensors: dict[str, torch.Tensor]) -> None:
    sharded = next(ft for ft in minilm_finetunes if ft.sharded)
    assert len(list(sharded.path.glob("model-*-of-*.safetensors"))) >= 2
    assert torch.isfinite(embed(sharded.path, sharded.path)).all()  # written by transformers
    for ft in minilm_finetunes:
        tensors = read_tensors(ft.path)
        changed = [n for n, v in tensors.items() if v.is_floating_point()
                   and not torch.equal(v, minilm_tensors[n])]
        assert len(changed) == sum(1 for v in minilm_tensors.values() if v.is_floating_point())


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
def test_linear_merges_of_three_finetunes(tmp_path: Path, minilm_dir: Path,
                                          minilm_finetunes: list[FineTune],
                                          minilm_tensors: dict[str, torch.Tensor],
                                          base_embeddings: torch.Tensor, method: str) -> None:
    weights = [1.0, 0.5, 2.0]
    models = [{"source": str(ft.path), "weight": w} for ft, w in zip(minilm_finetunes, weights,
                                                                     strict=True)]
    out = tmp_path / "merged"
    result = run_merge(spec_from_dict(job(minilm_dir, models, out, method=method,
                                          params={"alpha": 0.5} if method != "average" else {})))
    merged = read_tensors(out)
    assert set(merged) == set(minilm_tensors)
    tasks = [read_tensors(ft.path) for ft in minilm_finetunes]
    for name, theta0 in minilm_tensors.items():
        if not theta0.is_floating_point():  # integer buffers: copied bit-exactly
            assert torch.equal(merged[name], theta0)
            continue
        if method == "average":
            expected = sum(w * t[name] for w, t in zip(weights, tasks, strict=True)) / sum(weights)
        else:
            expected = theta0 + 0.5 * sum(w * (t[name] - theta0)
                                          for w, t in zip(weights, tasks, strict=True))
        assert merged[name].dtype == theta0.dtype
        assert relative_error(merged[name], expected) < 1e-6, name
    assert result.report["summary"]["merged"] == sum(1 for v in minilm_tensors.values()
                                                     if v.is_floating_point())
    embeddings = embed(out, minilm_dir)
    assert (_cosine(embeddings, base_embeddings) > 0.99).all()


def test_task_arithmetic_alpha_one_with_a_zero_task_is_that_task(
        tmp_path: Path, minilm_dir: Path, minilm_finetunes: list[FineTune]) -> None:
    """θ0 + 1·((θ1 − θ0) + (θ0 − θ0)) = θ1: the base itself is the zero task."""
    task = minilm_finetunes[0]
    out = tmp_path / "merged"
    run_merge(spec_from_dict(job(minilm_dir, [task.path, minilm_dir], out,
                                 params={"alpha": 1.0})))
    merged, expected = read_tensors(out), read_tensors(task.path)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        if not value.is_floating_point():
            assert torch.equal(merged[name], value)
        else:  # θ0 + (θ1 − θ0) in float32 is θ1 to within float32 rounding
            assert relative_error(merged[name], value) < 1e-6, name


def test_task_arithmetic_matches_a_hand_computation_in_float64(
        tmp_path: Path, minilm_dir: Path, minilm_finetunes: list[FineTune],
        minilm_tensors: dict[str, torch.Tensor]) -> None:
    """`compute_dtype: float64`: θ0 + α Σ w_t τ_t computed in float64, rounded once."""
    a, b = minilm_finetunes[0], minilm_finetunes[2]  # a single file and a sharded one
    out = tmp_path / "merged"
    # the 11.7M-entry word embeddings are left out to keep the check fast (and stay the base's)
    spec = job(minilm_dir, [{"source": str(a.path), "weight": 0.7},
                            {"source": str(b.path), "weight": -0.2}], out,
               params={"alpha": 0.3},
               options={"compute_dtype": "float64", "exclude": ["word_embeddings"]})
    run_merge(spec_from_dict(spec))
    merged, ta, tb = read_tensors(out), read_tensors(a.path), read_tensors(b.path)
    for name, theta0 in minilm_tensors.items():
        if not theta0.is_floating_point() or "word_embeddings" in name:
            assert torch.equal(merged[name], theta0)
            continue
        t0 = theta0.double()
        exact = t0 + 0.3 * (0.7 * (ta[name].double() - t0) - 0.2 * (tb[name].double() - t0))
        # rounded once to float32: within half an ulp of the float64 result (ties either way)
        rounded = exact.float()
        ulp = (torch.nextafter(rounded, torch.tensor(float("inf"))) - rounded).double()
        error = (merged[name].double() - exact).abs()
        assert bool((error <= 0.5 * ulp * (1 + 1e-6) + 1e-15 * t0.abs()).all()), name


@pytest.mark.parametrize("method", FULL_METHODS)
def test_every_full_output_method_gives_a_working_model(
        tmp_path: Path, minilm_dir: Path, minilm_finetunes: list[FineTune],
        minilm_tensors: dict[str, torch.Tensor], base_embeddings: torch.Tensor,
        method: str) -> None:
    out = tmp_path / "merged"
    spec = job(minilm_dir, [ft.path for ft in minilm_finetunes[:2]], out, method=method,
               options={"include": SWEEP_INCLUDE, "seed": 7})
    result = run_merge(spec_from_dict(spec))
    merged = read_tensors(out)
    assert set(merged) == set(minilm_tensors)
    in_scope = {n for n in minilm_tensors if any(re.search(p, n)
                                                  for p in SWEEP_INCLUDE)}
    for name, value in merged.items():
        assert value.dtype == minilm_tensors[name].dtype
        assert value.shape == minilm_tensors[name].shape
        assert torch.isfinite(value.float()).all(), name
        if name not in in_scope:
            assert torch.equal(value, minilm_tensors[name]), name
    changed = [n for n in in_scope if not torch.equal(merged[n], minilm_tensors[n])]
    assert changed, f"{method} changed none of the merged tensors"
    assert set(result.report["tensors"]) == in_scope
    embeddings = embed(out, minilm_dir)
    assert (_cosine(embeddings, base_embeddings) > 0.95).all()
