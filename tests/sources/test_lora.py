"""PEFT LoRA adapters: config parsing, scales, patterns, orientation, prefixes, rejections."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_service.engine import run_merge
from merge_service.errors import PreflightError
from merge_service.sources.lora import LoraAdapter, is_adapter_dir, pattern_value
from merge_service.spec import spec_from_dict
from tests.conftest import (
    MINILM_ADAPTERS,
    build_adapter,
    job,
    peft_merged_state,
    read_tensors,
    relative_error,
)

pytestmark = pytest.mark.usefixtures("hf_offline")


def base_names(directory: Path) -> set[str]:
    return set(read_tensors(directory))


def open_adapter(path: Path, base_dir: Path, label: str = "task1") -> LoraAdapter:
    adapter, problems = LoraAdapter.open(path, label, base_names(base_dir))
    assert problems == [] and adapter is not None
    return adapter


def open_problems(path: Path, names: set[str] | None = None) -> list[str]:
    adapter, problems = LoraAdapter.open(path, "task1", names or set())
    assert adapter is None and problems
    assert all(p.model == "task1" for p in problems)
    return [p.message for p in problems]


def merge_full(tmp_path: Path, base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    out = tmp_path / "merged"
    run_merge(spec_from_dict(job(base, adapters, out, space="full", params={"alpha": 1.0})))
    return read_tensors(out)


# --------------------------------------------------------------------------------------------
# scales: alpha / r, alpha / sqrt(r), rank_pattern and alpha_pattern, as peft computes them


@pytest.mark.parametrize("name", list(MINILM_ADAPTERS))
def test_scales_and_ranks_equal_peft_scaling(minilm_dir: Path, minilm_adapters: dict[str, Path],
                                             name: str) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    ours = open_adapter(minilm_adapters[name], minilm_dir)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_dir),
                                      minilm_adapters[name])
    seen = set()
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            target = module_name.removeprefix("base_model.model.") + ".weight"
            mine = ours.modules[target]
            assert mine.rank == module.r["default"], target
            assert mine.scale == pytest.approx(module.scaling["default"], rel=1e-12), target
            assert not mine.transposed
            seen.add(target)
    assert seen == set(ours.modules)
    config = MINILM_ADAPTERS[name]
    for module in ours.modules.values():
        expected = module.alpha / (math.sqrt(module.rank) if config.get("use_rslora")
                                   else module.rank)
        assert module.scale == pytest.approx(expected)


def test_pattern_adapter_values(minilm_dir: Path, minilm_adapters: dict[str, Path]) -> None:
    modules = open_adapter(minilm_adapters["pattern"], minilm_dir).modules
    q0 = modules["encoder.layer.0.attention.self.query.weight"]
    q1 = modules["encoder.layer.1.attention.self.query.weight"]
    v1 = modules["encoder.layer.1.attention.self.value.weight"]
    v2 = modules["encoder.layer.2.attention.self.value.weight"]
    assert (q0.rank, q0.alpha, q0.scale) == (2, 8, 4.0)
    assert (q1.rank, q1.alpha, q1.scale) == (8, 8, 1.0)
    assert (v1.rank, v1.alpha, v1.scale) == (4, 32, 8.0)
    assert (v2.rank, v2.alpha, v2.scale) == (4, 8, 2.0)


def test_rslora_scale(minilm_dir: Path, minilm_adapters: dict[str, Path]) -> None:
    adapter = open_adapter(minilm_adapters["rslora"], minilm_dir)
    assert {m.scale for m in adapter.modules.values()} == {8 / math.sqrt(4)}
    # "dense" suffix-matches attention.output, intermediate, output and the pooler
    assert "pooler.dense.weight" in adapter.modules
    assert "encoder.layer.5.intermediate.dense.weight" in adapter.modules
    assert len(adapter.modules) == 6 * 5 + 1


def test_modules_to_save_are_ordinary_tensors(minilm_dir: Path,
                                              minilm_adapters: dict[str, Path]) -> None:
    adapter = open_adapter(minilm_adapters["qv"], minilm_dir)
    assert set(adapter.extras) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert len(adapter.modules) == 12
    assert adapter.base_model_name == str(minilm_dir)


PATTERN_CASES = [
    ({"query": 2}, "encoder.layer.0.attention.self.query"),
    ({"query": 2}, "encoder.layer.0.attention.self.query_proj"),
    ({"layer.0.attention.self.query": 2, "query": 3}, "encoder.layer.0.attention.self.query"),
    ({"query": 3, "layer.0.attention.self.query": 2}, "encoder.layer.0.attention.self.query"),
    ({"layer.0.attention.self.query": 2}, "encoder.layer.10.attention.self.query"),
    ({r"layer\.[0-2]\.attention\.self\.query": 5}, "encoder.layer.1.attention.self.query"),
    ({r"layer\.[0-2]\.attention\.self\.query": 5}, "encoder.layer.3.attention.self.query"),
    ({"self.query|self.key": 6}, "encoder.layer.3.attention.self.key"),
    ({"encoder.layer.0.attention.self.query": 7}, "encoder.layer.0.attention.self.query"),
    ({"uery": 7}, "encoder.layer.0.attention.self.query"),
    ({"dense": 7}, "encoder.layer.0.attention.output.dense"),
    ({"output.dense": 7}, "encoder.layer.0.output.dense"),
    ({"output.dense": 7}, "encoder.layer.0.intermediate.dense"),
    ({"model.decoder.layers.0.q": 9}, "decoder.layers.0.q"),
    ({}, "anything"),
]


@pytest.mark.parametrize(("patterns", "module"), PATTERN_CASES)
def test_pattern_matching_is_peft_rule(patterns: dict[str, int], module: str) -> None:
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    expected = patterns.get(key, -1)
    assert pattern_value(patterns, module, -1) == expected


# --------------------------------------------------------------------------------------------
# orientation: fan_in_fan_out (GPT-2 Conv1D) and embedding LoRA


def test_fan_in_fan_out_gpt2_matches_peft(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    from transformers import AutoModel

    adapters = []
    for seed, targets in enumerate((["c_attn"], ["c_attn", "c_proj"])):
        adapters.append(build_adapter(AutoModel.from_pretrained(tiny_gpt2_dir),
                                      tmp_path / f"gpt2-lora-{seed}", seed, r=4 - 2 * seed,
                                      lora_alpha=8, target_modules=targets, fan_in_fan_out=True))
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    adapter = open_adapter(adapters[0], tiny_gpt2_dir)
    module = adapter.modules["h.0.attn.c_attn.weight"]
    assert module.transposed
    assert (module.out_features, module.in_features) == (32, 96)  # Conv1D stores (in, out)
    a, b, scale = adapter.factors("h.0.attn.c_attn.weight")
    assert (b @ a).shape == (32, 96) and scale == 2.0

    base = read_tensors(tiny_gpt2_dir)
    ours = merge_full(tmp_path, tiny_gpt2_dir, adapters)
    reference = peft_merged_state(tiny_gpt2_dir, adapters)
    changed = 0
    for name, value in reference.items():
        if name not in base:  # buffers transformers does not save
            continue
        assert relative_error(ours[name], value) < 1e-6, name
        changed += not torch.equal(ours[name], base[name])
    assert changed == 3  # attn.c_attn, and attn.c_proj and mlp.c_proj ("c_proj")


def test_embedding_lora_matches_peft(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from transformers import AutoModel

    adapters = [build_adapter(AutoModel.from_pretrained(tiny_bert_dir), tmp_path / f"emb-{i}",
                              i, r=4, lora_alpha=4 * (i + 1),
                              target_modules=["word_embeddings", "query"])
                for i in range(2)]
    adapter = open_adapter(adapters[0], tiny_bert_dir)
    module = adapter.modules["embeddings.word_embeddings.weight"]
    assert module.transposed and (module.out_features, module.in_features) == (100, 32)
    ours = merge_full(tmp_path, tiny_bert_dir, adapters)
    reference = peft_merged_state(tiny_bert_dir, adapters)
    base = read_tensors(tiny_bert_dir)
    for name in base:
        assert relative_error(ours[name], reference[name]) < 1e-6, name
    assert not torch.equal(ours["embeddings.word_embeddings.weight"],
                           base["embeddings.word_embeddings.weight"])


# --------------------------------------------------------------------------------------------
# prefixes: the model class the adapter was trained on is not the base's


def test_adapter_trained_on_a_task_head_class_maps_onto_the_bare_base(
        tmp_path: Path, tiny_bert_dir: Path) -> None:
    """BertForSequenceClassification names `bert.encoder...`; the base has `encoder...`."""
    from transformers import BertForSequenceClassification

    adapters = []
    for seed in range(2):
        model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        adapters.append(build_adapter(model, tmp_path / f"cls-{seed}", seed, r=4,
                                      lora_alpha=8, target_modules=["query", "value"]))
    keys = load_file(adapters[0] / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.bert.encoder.") for k in keys)
    adapter = open_adapter(adapters[0], tiny_bert_dir)
    assert set(adapter.modules) == {f"encoder.layer.{i}.attention.self.{m}.weight"
                                    for i in range(2) for m in ("query", "value")}
    assert adapter.modules["encoder.layer.0.attention.self.query.weight"].module == \
        "bert.encoder.layer.0.attention.self.query"

    ours = merge_full(tmp_path, tiny_bert_dir, adapters)
    reference = peft_merged_state(tiny_bert_dir, adapters, "BertForSequenceClassification")
    base = read_tensors(tiny_bert_dir)
    for name in base:
        assert relative_error(ours[name], reference[f"bert.{name}"]) < 1e-6, name


def test_adapter_of_the_bare_model_maps_onto_a_prefixed_base(
        tmp_path: Path, tiny_bert_dir: Path) -> None:
    from transformers import AutoModel, BertForSequenceClassification

    prefixed = tmp_path / "base-cls"
    BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2) \
        .save_pretrained(prefixed)
    assert all(n.startswith(("bert.", "classifier.")) for n in base_names(prefixed))
    path = build_adapter(AutoModel.from_pretrained(tiny_bert_dir), tmp_path / "bare", 0, r=2,
                         lora_alpha=2, target_modules=["key"])
    adapter = open_adapter(path, prefixed)
    assert set(adapter.modules) == {"bert.encoder.layer.0.attention.self.key.weight",
                                    "bert.encoder.layer.1.attention.self.key.weight"}


# --------------------------------------------------------------------------------------------
# what is rejected, with a message that says why


def test_dora_adapter_is_rejected(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from transformers import AutoModel

    path = build_adapter(AutoModel.from_pretrained(tiny_bert_dir), tmp_path / "dora", 0, r=4,
                         lora_alpha=8, target_modules=["query"], use_dora=True)
    assert any("lora_magnitude_vector" in k
               for k in load_file(path / "adapter_model.safetensors"))
    [message] = open_problems(path, base_names(tiny_bert_dir))
    assert "DoRA" in message and "not supported" in message
    # a DoRA adapter whose config does not say so is caught by its tensors
    config = json.loads((path / "adapter_config.json").read_text())
    config["use_dora"] = False
    (path / "adapter_config.json").write_text(json.dumps(config))
    [message] = open_problems(path, base_names(tiny_bert_dir))
    assert "DoRA" in message and "lora_magnitude_vector" in message


def test_dora_rejected_at_preflight_with_the_model_named(tmp_path: Path,
                                                         tiny_bert_dir: Path) -> None:
    from transformers import AutoModel

    paths = [build_adapter(AutoModel.from_pretrained(tiny_bert_dir), tmp_path / name, i, r=2,
                           lora_alpha=2, target_modules=["query"], use_dora=dora)
             for i, (name, dora) in enumerate((("plain", False), ("dora", True)))]
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as info:
        run_merge(spec_from_dict(job(tiny_bert_dir, paths, out, space="full")))
    assert [(p.model, "DoRA" in p.message) for p in info.value.problems] == [("dora", True)]
    assert not out.exists()


def test_other_peft_types_are_rejected(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModel

    model = get_peft_model(AutoModel.from_pretrained(tiny_bert_dir),
                           IA3Config(target_modules=["query", "intermediate.dense"],
                                     feedforward_modules=["intermediate.dense"]))
    model.save_pretrained(tmp_path / "ia3")
    messages = open_problems(tmp_path / "ia3")
    assert any("peft_type IA3 is not supported" in m for m in messages)


@pytest.fixture
def small_adapter(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    from transformers import AutoModel

    return build_adapter(AutoModel.from_pretrained(tiny_bert_dir), tmp_path / "small", 0, r=4,
                         lora_alpha=8, target_modules=["query"])


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_config_rank_that_disagrees_with_the_tensors(small_adapter: Path,
                                                     tiny_bert_dir: Path) -> None:
    edit_config(small_adapter, r=8)
    messages = open_problems(small_adapter, base_names(tiny_bert_dir))
    assert len(messages) == 2  # both query modules
    assert "config gives rank 8" in messages[0] and "its lora_A has rank 4" in messages[0]


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("r", 0, "r must be a positive integer, got 0"),
    ("r", "eight", "r must be a positive integer, got 'eight'"),
    ("r", 4.5, "r must be a positive integer, got 4.5"),
    ("r", True, "r must be a positive integer, got True"),
    ("lora_alpha", -1, "lora_alpha must be a positive number, got -1"),
    ("lora_alpha", float("inf"), "lora_alpha must be a positive number, got inf"),
    ("lora_alpha", float("nan"), "lora_alpha must be a positive number, got nan"),
    ("rank_pattern", ["x"], 'rank_pattern must be an object of module patterns, got ["x"]'),
    ("rank_pattern", {"[": 4}, "rank_pattern: '[' is not a regex"),
    ("rank_pattern", {"query": 2.5}, "rank_pattern: 'query' must map to a positive integer"),
    ("alpha_pattern", {"query": "abc"}, "alpha_pattern: 'query' must map to a positive number"),
    ("alpha_pattern", {"query": 0}, "alpha_pattern: 'query' must map to a positive number"),
    ("base_model_name_or_path", 123, "base_model_name_or_path must be a string, got 123"),
    ("base_model_name_or_path", ["a"], 'base_model_name_or_path must be a string, got ["a"]'),
])
def test_malformed_config_values(small_adapter: Path, key: str, value: object,
                                 expected: str) -> None:
    """Each a problem naming the key (they were tracebacks, or merged into Inf/NaN weights)."""
    edit_config(small_adapter, **{key: value})
    messages = open_problems(small_adapter)
    assert any(expected in m for m in messages), messages


def test_an_integral_float_rank_is_a_rank(small_adapter: Path, tiny_bert_dir: Path) -> None:
    edit_config(small_adapter, r=4.0, rank_pattern={"query": 4.0})
    adapter, problems = LoraAdapter.open(small_adapter, "task1", base_names(tiny_bert_dir))
    assert adapter is not None and problems == []


@pytest.mark.parametrize(("key", "value"), [
    ("layer_replication", [[0, 2]]), ("alora_invocation_tokens", [128002, 9]),
    ("use_qalora", True), ("lora_bias", True), ("arrow_config", {"top_k": 3}),
    ("monteclora_config", {"n_samples": 4}), ("kasa_config", {}),
    ("target_parameters", ["experts.gate_up_proj"]), ("trainable_token_indices", [5, 7])])
def test_lora_variants_are_rejected(small_adapter: Path, key: str, value: object) -> None:
    edit_config(small_adapter, **{key: value})
    assert [m for m in open_problems(small_adapter) if key in m and "only plain LoRA" in m]


@pytest.mark.parametrize(("key", "value"), [("use_qalora", False), ("layer_replication", None),
                                            ("target_parameters", []), ("velora_config", {}),
                                            ("use_bdlora", {"lora_a_is_blockdiagonal": True})])
def test_settings_that_leave_plain_lora(small_adapter: Path, tiny_bert_dir: Path, key: str,
                                        value: object) -> None:
    """Unset variants, and VeLoRA and BD-LoRA (they change training, not the weights)."""
    edit_config(small_adapter, **{key: value})
    adapter, problems = LoraAdapter.open(small_adapter, "task1", base_names(tiny_bert_dir))
    assert adapter is not None and problems == []


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_adapter_config_that_is_not_a_json_object(small_adapter: Path, text: str) -> None:
    (small_adapter / "adapter_config.json").write_text(text)
    [message] = open_problems(small_adapter)
    assert "adapter_config.json is not" in message


def test_weights_missing_or_bin_only(small_adapter: Path) -> None:
    weights = small_adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    weights.unlink()
    [message] = open_problems(small_adapter)
    assert message == "adapter_model.safetensors is missing"
    torch.save(tensors, small_adapter / "adapter_model.bin")
    [message] = open_problems(small_adapter)
    assert "adapter_model.bin is not supported" in message


def test_truncated_adapter_weights(small_adapter: Path) -> None:
    weights = small_adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 + 100])
    [message] = open_problems(small_adapter)
    assert message.startswith("adapter_model.safetensors: truncated")


def test_a_module_with_only_lora_a(small_adapter: Path, tiny_bert_dir: Path) -> None:
    weights = small_adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = next(k for k in tensors if "layer.1" in k and "lora_B" in k)
    del tensors[dropped]
    save_file(tensors, weights)
    [message] = open_problems(small_adapter, base_names(tiny_bert_dir))
    assert "encoder.layer.1.attention.self.query has only lora_A" in message


def test_mismatched_factor_ranks(small_adapter: Path, tiny_bert_dir: Path) -> None:
    weights = small_adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "layer.0" in k and "lora_B" in k)
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, weights)
    [message] = open_problems(small_adapter, base_names(tiny_bert_dir))
    assert "have different ranks" in message and "[4, 32]" in message


def test_is_adapter_dir(small_adapter: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    assert is_adapter_dir(small_adapter)
    assert not is_adapter_dir(tiny_bert_dir)
    shutil.copytree(small_adapter, tmp_path / "copy")
    assert is_adapter_dir(tmp_path / "copy")
