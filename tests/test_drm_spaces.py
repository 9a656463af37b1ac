"""`drm` through the engine on real MiniLM weights: full fine-tunes, and LoRA adapters in the
`full`, `core` and `knots` spaces (METHODS.md sections 10, 11)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from merge_service.engine import run_merge
from merge_service.methods import build_method
from merge_service.methods.base import TensorTask
from merge_service.sources.lora import LoraAdapter
from merge_service.spaces import core_space
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

QUERY0 = "encoder.layer.0.attention.self.query.weight"


def forward(model_dir: Path, tokenizer_dir: Path) -> torch.Tensor:
    """Last hidden states of `TEXTS` from the model loaded by transformers (finite, 384-wide)."""
    return last_hidden_states(model_dir, tokenizer_dir)[0]


def drm_rule(vectors: list[torch.Tensor], weights: list[float], name: str = QUERY0,
             **params) -> tuple[torch.Tensor, dict]:
    method, problems = build_method("drm", params)
    assert method is not None, problems
    task = TensorTask(name=name, task_vectors=[v.clone() for v in vectors],
                      weights=list(weights), is_2d=vectors[0].dim() == 2)
    delta = method.merge(task).delta
    assert delta is not None
    return delta, task.diagnostics


# ---------------------------------------------------------------------------------------------
# full checkpoints


def test_drm_of_three_minilm_finetunes_is_a_working_model(
        tmp_path: Path, minilm_dir: Path, minilm_finetunes: list[FineTune],
        minilm_tensors: dict[str, torch.Tensor]) -> None:
    weights = [1.0, 0.5, 2.0]
    models = [{"source": str(ft.path), "weight": w}
              for ft, w in zip(minilm_finetunes, weights, strict=True)]
    out = tmp_path / "merged"
    result = run_merge(spec_from_dict(job(minilm_dir, models, out, method="drm")))
    merged = read_tensors(out)
    assert set(merged) == set(minilm_tensors)
    report = result.report
    assert report["method"]["params"]["drop_rate"] == 0.8
    matrices = 0
    for name, theta0 in minilm_tensors.items():
        assert merged[name].dtype == theta0.dtype and merged[name].shape == theta0.shape
        if not theta0.is_floating_point():
            assert torch.equal(merged[name], theta0)
            continue
        assert torch.isfinite(merged[name]).all(), name
        info = report["tensors"][name]
        assert 0 <= info["sign_conflict"] <= 1
        if theta0.dim() == 2 and "embeddings" not in name:  # a matrix: the decomposition
            matrices += 1
            assert info["direction"] == "horizontal"
            assert 1 <= info["rank"] <= min(theta0.shape[0], 3 * theta0.shape[1])
            assert 0.7 < info["pruned_fraction"] < 0.8
        else:  # 1-D tensors and the svd-excluded embeddings: the non-matrix rule
            assert "direction" not in info, name
    assert matrices == 6 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler

    # one matrix against the rule run on the task vectors read back from the files
    tasks = [read_tensors(ft.path) for ft in minilm_finetunes]
    theta0 = minilm_tensors[QUERY0]
    expected, _ = drm_rule([t[QUERY0] - theta0 for t in tasks], weights)
    assert relative_error(merged[QUERY0] - theta0, expected) < 1e-4

    hidden = forward(out, minilm_dir)
    with offline():
        base_hidden = forward(minilm_dir, minilm_dir)
    cosine = torch.nn.functional.cosine_similarity(hidden.mean(1), base_hidden.mean(1), dim=-1)
    assert (cosine > 0.95).all()


@pytest.mark.parametrize("direction", ["vertical", "auto"])
def test_vertical_and_auto_directions_through_the_engine(
        tmp_path: Path, minilm_dir: Path, minilm_finetunes: list[FineTune],
        minilm_tensors: dict[str, torch.Tensor], direction: str) -> None:
    include = [r"encoder\.layer\.0\.(attention\.self\.query|intermediate\.dense|output\.dense)\."]
    out = tmp_path / "merged"
    result = run_merge(spec_from_dict(job(
        minilm_dir, [ft.path for ft in minilm_finetunes[:2]], out, method="drm",
        params={"direction": direction, "drop_rate": 0.5},
        options={"include": include})))
    tasks = [read_tensors(ft.path) for ft in minilm_finetunes[:2]]
    merged = read_tensors(out)
    matrices = [n for n in result.report["tensors"] if minilm_tensors[n].dim() == 2]
    assert len(matrices) == 3
    for name in matrices:
        info = result.report["tensors"][name]
        taus = [t[name] - minilm_tensors[name] for t in tasks]
        if direction == "auto":
            h = int(torch.linalg.matrix_rank(torch.cat(taus, 1), rtol=0.1))
            v = int(torch.linalg.matrix_rank(torch.cat(taus, 0), rtol=0.1))
            assert info["stacked_ranks"] == {"horizontal": h, "vertical": v}
            assert info["direction"] == ("horizontal" if h < v else "vertical")
        else:
            assert info["direction"] == "vertical"
        expected, _ = drm_rule(taus, [1.0, 1.0], name, direction=direction, drop_rate=0.5)
        assert relative_error(merged[name] - minilm_tensors[name], expected) < 1e-4, name
    forward(out, minilm_dir)


# ---------------------------------------------------------------------------------------------
# LoRA adapters


def _merge_adapters(tmp_path: Path, minilm_dir: Path, adapters: list[Path], out: str,
                    weights: list[float] | None = None, **fields):
    models = [{"source": str(a), "weight": w}
              for a, w in zip(adapters, weights or [1.0] * len(adapters), strict=True)]
    spec = job(minilm_dir, models, tmp_path / out, method="drm", **fields)
    spec["options"] = {"compute_dtype": "float64", **spec.get("options", {})}
    return run_merge(spec_from_dict(spec))


@pytest.mark.parametrize("space", ["core", "knots", "full"])
def test_drm_of_lora_adapters_gives_a_working_model(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path],
        minilm_tensors: dict[str, torch.Tensor], space: str) -> None:
    # full space forms every ΔW_t and decomposes m × T·n stacks: two layers keep it quick
    options = {"include": [r"^encoder\.layer\.[01]\."]} if space == "full" else {}
    result = _merge_adapters(tmp_path, minilm_dir, list(minilm_adapters.values()), "merged",
                             weights=[1.0, 0.5, 2.0], space=space, options=options)
    assert result.report["space"] == space
    merged = read_tensors(result.destination)
    changed = [n for n in minilm_tensors if not torch.equal(merged[n], minilm_tensors[n])]
    assert changed
    for name in changed:
        assert torch.isfinite(merged[name]).all(), name
    module = result.report["tensors"][QUERY0]
    assert module["direction"] == "horizontal" and module["rank"] >= 1
    if space != "full":  # the rule ran on small matrices: Σr = 8 + 4 + 2 for this module
        assert module["space_shape"][0] <= 14
        assert module["space_shape"][1] == (14 if space == "core" else 384)
    forward(result.destination, minilm_dir)


def test_core_space_lora_output_loads_in_peft_and_equals_the_full_output(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    adapters = list(minilm_adapters.values())
    weights = [1.0, -0.5, 2.0]
    full = _merge_adapters(tmp_path, minilm_dir, adapters, "full", weights, space="core")
    lora = _merge_adapters(tmp_path, minilm_dir, adapters, "lora", weights, space="core",
                           output={"format": "lora"})
    config = json.loads((lora.destination / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    with offline():
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_dir),
                                          lora.destination).merge_and_unload()
    merged = model.state_dict()
    expected = read_tensors(full.destination)
    compared = 0
    for name, value in expected.items():
        if name in merged and value.is_floating_point():
            assert relative_error(merged[name], value) < 1e-5, name
            compared += 1
    assert compared > 0


def test_core_space_runs_the_rule_on_the_unweighted_cores_with_c_t_w_t(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path],
        minilm_tensors: dict[str, torch.Tensor]) -> None:
    """`M_t = U_Bᵀ (s_t B_t A_t) V_A`, and the per-model weights enter as DRM's coefficients
    `c_t = w_t` after the shared decomposition, as in full space (not folded into `B_t`)."""
    adapters = list(minilm_adapters.values())
    weights = [1.0, -0.5, 2.0]
    result = _merge_adapters(tmp_path, minilm_dir, adapters, "core", weights, space="core")
    factors = []
    for i, path in enumerate(adapters):
        adapter, problems = LoraAdapter.open(path, f"a{i}", set(minilm_tensors))
        assert adapter is not None, problems
        a, b, scale = adapter.factors(QUERY0)
        factors.append((a.double(), b.double() * scale))
        adapter.close()
    space = core_space(factors)
    merged_core, _ = drm_rule(space.cores, weights)
    expected = space.to_full(merged_core)
    theta0 = minilm_tensors[QUERY0]
    assert relative_error(read_tensors(result.destination)[QUERY0].double() - theta0.double(),
                          expected) < 1e-4


@pytest.mark.parametrize("space", ["full", "core", "knots"])
def test_weights_act_once_in_every_space(tmp_path: Path, minilm_dir: Path,
                                         minilm_adapters: dict[str, Path],
                                         minilm_tensors: dict[str, torch.Tensor],
                                         space: str) -> None:
    """A uniform weight 2 doubles every merged delta (weights applied once, never twice), and
    at drop_rate 0 the matrices take the unweighted disjoint mean whatever the weights."""
    adapters = list(minilm_adapters.values())
    lora_modules = r"^encoder\.layer\.[01]\..*\.(query|key|value)\.weight$"
    options = {"include": [lora_modules]}
    one = read_tensors(_merge_adapters(tmp_path, minilm_dir, adapters, "one", space=space,
                                       options=options).destination)
    two = read_tensors(_merge_adapters(tmp_path, minilm_dir, adapters, "two", [2.0] * 3,
                                       space=space, options=options).destination)
    zero_rate = [read_tensors(_merge_adapters(
        tmp_path, minilm_dir, adapters, f"rate0_{i}", w, space=space, options=options,
        params={"drop_rate": 0.0}).destination) for i, w in enumerate([[1.0] * 3,
                                                                       [2.0, -1.0, 0.5]])]
    names = [n for n in minilm_tensors if re.search(lora_modules, n)]
    assert len(names) == 6
    for name in names:
        theta0 = minilm_tensors[name].double()
        d1, d2 = one[name].double() - theta0, two[name].double() - theta0
        assert d1.abs().max() > 0, name
        assert relative_error(d2, 2 * d1) < 1e-4, name
        assert relative_error(zero_rate[1][name], zero_rate[0][name]) == 0.0, name
