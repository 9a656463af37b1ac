"""LoRA adapters merged in `space: full` against `peft`'s own merge of the same adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge_service.engine import run_merge
from merge_service.errors import PreflightError
from merge_service.spec import spec_from_dict
from tests.conftest import (
    MINILM_ADAPTERS,
    fill_lora,
    job,
    offline,
    peft_merged_state,
    read_tensors,
    relative_error,
)

pytestmark = pytest.mark.usefixtures("hf_offline")


def _merge(tmp_path: Path, base: Path, models: list, **fields) -> dict[str, torch.Tensor]:
    out = tmp_path / "merged"
    fields.setdefault("space", "full")
    run_merge(spec_from_dict(job(base, models, out, **fields)))
    return read_tensors(out)


def _assert_matches(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                    base: dict[str, torch.Tensor]) -> None:
    """Every tensor of the reference model equals ours: to float32 rounding where it changed,
    bit for bit where it did not."""
    assert set(reference) <= set(ours)
    changed = 0
    for name, expected in reference.items():
        if torch.equal(expected, base[name]):
            assert torch.equal(ours[name], base[name]), f"{name} should be the base's"
            continue
        changed += 1
        delta_ref = expected.double() - base[name].double()
        delta_ours = ours[name].double() - base[name].double()
        assert relative_error(ours[name], expected) < 1e-6, name
        assert relative_error(delta_ours, delta_ref) < 1e-4, name  # the update itself
    assert changed > 0


@pytest.fixture(scope="module")
def peft_reference(minilm_dir: Path, minilm_adapters: dict[str, Path]
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """peft's merge of all three adapters, and of each one alone (module-scoped: reused)."""
    refs = {"all": peft_merged_state(minilm_dir, list(minilm_adapters.values()))}
    for name, path in minilm_adapters.items():
        refs[name] = peft_merged_state(minilm_dir, [path])
    return refs


def test_task_arithmetic_alpha_one_equals_peft_merge_of_all_adapters(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path],
        minilm_tensors: dict[str, torch.Tensor],
        peft_reference: dict[str, dict[str, torch.Tensor]]) -> None:
    """Σ_t ΔW_t over adapters with different targets, ranks, rslora and patterns; the pooler
    carried by `qv` (modules_to_save) is an ordinary task vector."""
    ours = _merge(tmp_path, minilm_dir, list(minilm_adapters.values()), params={"alpha": 1.0})
    _assert_matches(ours, peft_reference["all"], minilm_tensors)
    # embeddings, layer norms and biases are in no adapter: untouched
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.3.output.LayerNorm.weight",
                 "encoder.layer.0.attention.self.query.bias", "embeddings.position_ids"):
        assert torch.equal(ours[name], minilm_tensors[name])


@pytest.mark.parametrize("adapter", list(MINILM_ADAPTERS))
def test_each_adapter_scales_like_peft(tmp_path: Path, minilm_dir: Path,
                                       minilm_adapters: dict[str, Path],
                                       minilm_tensors: dict[str, torch.Tensor],
                                       peft_reference: dict[str, dict[str, torch.Tensor]],
                                       adapter: str) -> None:
    """One adapter at weight 1, another at weight 0: exactly that adapter's scaled update
    (alpha/r, alpha/sqrt(r) with rslora, rank_pattern and alpha_pattern per module)."""
    other = next(name for name in minilm_adapters if name != adapter)
    models = [{"source": str(minilm_adapters[adapter])},
              {"source": str(minilm_adapters[other]), "weight": 0.0}]
    ours = _merge(tmp_path, minilm_dir, models, params={"alpha": 1.0})
    reference = peft_reference[adapter]
    _assert_matches(ours, reference, minilm_tensors)
    # modules only the weight-0 adapter targets keep the base values exactly
    for name, value in reference.items():
        if torch.equal(value, minilm_tensors[name]):
            assert torch.equal(ours[name], minilm_tensors[name]), name


def test_weights_match_peft_weighted_cat_adapter(tmp_path: Path, minilm_dir: Path,
                                                 minilm_adapters: dict[str, Path],
                                                 minilm_tensors: dict[str, torch.Tensor]) -> None:
    """w_t: peft's `add_weighted_adapter(combination_type="cat")` is exactly Σ w_t ΔW_t."""
    from peft import PeftModel
    from transformers import AutoModel

    weights = [0.5, -1.5]
    paths = [minilm_adapters["qv"], minilm_adapters["pattern"]]
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_dir), paths[0],
                                      adapter_name="a")
    model.load_adapter(paths[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, adapter_name="ab", combination_type="cat")
    model.set_adapter("ab")
    reference = model.merge_and_unload(adapter_names=["ab"]).state_dict()
    # the pooler of `qv` is a modules_to_save copy, not a LoRA: peft's cat ignores it
    models = [{"source": str(p), "weight": w} for p, w in zip(paths, weights, strict=True)]
    ours = _merge(tmp_path, minilm_dir, models, params={"alpha": 1.0},
                  options={"exclude": [r"^pooler\."]})
    _assert_matches(ours, {k: v for k, v in reference.items() if not k.startswith("pooler.")},
                    minilm_tensors)


def test_alpha_scales_the_summed_updates(tmp_path: Path, minilm_dir: Path,
                                         minilm_adapters: dict[str, Path],
                                         minilm_tensors: dict[str, torch.Tensor],
                                         peft_reference: dict[str, dict[str, torch.Tensor]]
                                         ) -> None:
    ours = _merge(tmp_path, minilm_dir, list(minilm_adapters.values()), params={"alpha": 0.3})
    for name, full in peft_reference["all"].items():
        expected = minilm_tensors[name].double() + 0.3 * (full.double()
                                                          - minilm_tensors[name].double())
        assert relative_error(ours[name], expected) < 1e-6, name


def test_merged_adapters_give_a_working_model(tmp_path: Path, minilm_dir: Path,
                                              minilm_adapters: dict[str, Path]) -> None:
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "merged"
    run_merge(spec_from_dict(job(minilm_dir, list(minilm_adapters.values()), out,
                                 method="average", space="full")))
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer was copied from the base
    batch = tokenizer(["LoRA adapters, merged."], return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(out)(**batch).last_hidden_state
    assert hidden.shape == (1, batch["input_ids"].shape[1], 384)
    assert torch.isfinite(hidden).all()


def test_space_auto_is_core_and_equals_full_for_task_arithmetic(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path],
        minilm_tensors: dict[str, torch.Tensor]) -> None:
    """METHODS.md section 10: for a linear method `core` is exact, so auto (= core) gives the
    `full` space result to rounding."""
    models = [{"source": str(p), "weight": w}
              for p, w in zip(minilm_adapters.values(), (1.0, 0.5, -0.7), strict=True)]
    # the pooler is a LoRA module of one adapter and a modules_to_save copy in another: see
    # test_core_space_sums_a_lora_module_and_a_full_tensor_of_one_weight
    options = {"exclude": [r"^pooler\."]}
    spec = spec_from_dict(job(minilm_dir, models, tmp_path / "auto", params={"alpha": 0.8},
                              options=options))
    assert spec.space == "auto"
    result = run_merge(spec)
    assert result.report["space"] == "core"
    auto = read_tensors(tmp_path / "auto")
    full = _merge(tmp_path, minilm_dir, models, params={"alpha": 0.8}, options=options)
    assert set(auto) == set(full)
    for name, value in full.items():
        assert relative_error(auto[name], value) < 1e-5, name
        delta = value.double() - minilm_tensors[name].double()
        if delta.abs().max() > 0:
            assert relative_error(auto[name].double() - minilm_tensors[name].double(),
                                  delta) < 1e-3, name


def test_core_space_sums_a_lora_module_and_a_full_tensor_of_one_weight(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path]) -> None:
    models = [minilm_adapters["qv"], minilm_adapters["rslora"]]  # both touch pooler.dense
    options = {"include": [r"^pooler\.dense\.weight$"]}
    core = _merge(tmp_path / "core", minilm_dir, models, space="core", params={"alpha": 1.0},
                  options=options)
    full = _merge(tmp_path / "full", minilm_dir, models, params={"alpha": 1.0},
                  options=options)
    assert relative_error(core["pooler.dense.weight"], full["pooler.dense.weight"]) < 1e-5


def test_space_auto_with_a_full_space_only_method_is_a_clear_preflight_problem(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path]) -> None:
    """`average` runs in `full` space only; auto means core for LoRA inputs: say so."""
    out = tmp_path / "merged"
    spec = spec_from_dict(job(minilm_dir, list(minilm_adapters.values())[:2], out,
                              method="average"))
    with pytest.raises(PreflightError) as info:
        run_merge(spec)
    problems = [p for p in info.value.problems if p.field == "space"]
    assert len(problems) == 1, info.value.problems
    assert "average" in problems[0].message and "core" in problems[0].message
    assert "auto" in problems[0].message
    assert not out.exists()
    # explicitly in full space it runs
    run_merge(spec_from_dict(job(minilm_dir, list(minilm_adapters.values())[:2], out,
                                 method="average", space="full")))
    assert (out / "model.safetensors").is_file()


def test_format_lora_is_not_written_from_full_space(tmp_path: Path, minilm_dir: Path,
                                                   minilm_adapters: dict[str, Path]) -> None:
    out = tmp_path / "merged"
    spec = job(minilm_dir, list(minilm_adapters.values())[:2], out, space="full",
               output={"format": "lora"})
    with pytest.raises(PreflightError) as info:
        run_merge(spec_from_dict(spec))
    assert any(p.field in {"space", "output.format"} and "lora" in p.message
               for p in info.value.problems)
    assert not out.exists()


def test_touched_tensors_are_the_union_of_adapter_targets(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path],
        minilm_tensors: dict[str, torch.Tensor]) -> None:
    out = tmp_path / "merged"
    result = run_merge(spec_from_dict(job(minilm_dir, [minilm_adapters["qv"],
                                                       minilm_adapters["pattern"]],
                                          out, space="full")))
    report = result.report
    merged = set(report["tensors"])
    expected = {f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(6)
                for m in ("query", "value")} | {"pooler.dense.weight", "pooler.dense.bias"}
    assert merged == expected
    assert set(report["copied_tensors"]) == set(minilm_tensors) - expected
    assert all(t["action"] == "merged" for t in report["tensors"].values())
    assert {m["kind"] for m in report["models"]} == {"lora"}
    assert report["space"] == "full"


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_adapter_biases_are_task_vectors_as_peft_loads_them(
        tmp_path: Path, minilm_dir: Path, minilm_adapters: dict[str, Path],
        minilm_tensors: dict[str, torch.Tensor], bias: str) -> None:
    """peft saves a LoRA layer's trained bias as `<module>.base_layer.bias`: it updates the
    base's `<module>.bias`, as the other trained biases update theirs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    with offline():
        model = get_peft_model(AutoModel.from_pretrained(minilm_dir), LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], bias=bias))
    fill_lora(model, 7)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.01)
    model.save_pretrained(tmp_path / "biased")
    models = [{"source": str(tmp_path / "biased")},
              {"source": str(minilm_adapters["qv"]), "weight": 0.0}]
    ours = _merge(tmp_path, minilm_dir, models, params={"alpha": 1.0})
    _assert_matches(ours, peft_merged_state(minilm_dir, [tmp_path / "biased"]), minilm_tensors)
    query_bias = "encoder.layer.0.attention.self.query.bias"
    assert not torch.equal(ours[query_bias], minilm_tensors[query_bias])
    other_bias = "encoder.layer.0.attention.output.dense.bias"  # in no LoRA layer
    assert torch.equal(ours[other_bias], minilm_tensors[other_bias]) == (bias == "lora_only")
