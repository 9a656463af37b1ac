"""PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`).

For every LoRA module the adapter gives factors `(A, B, s)` oriented so that the update of
the base tensor *as stored* is `ΔW = s · B @ A` (METHODS.md section 0). `fan_in_fan_out`
layers and embedding LoRA store the transpose; we swap and transpose the factors once here so
that nothing downstream needs to know.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_service.errors import Problem
from merge_service.sources.checkpoint import (
    SafetensorsFileError,
    TensorInfo,
    read_safetensors_header,
    read_tensor,
)
from merge_service.sources.names import prefix_change

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# `<module>.lora_A.weight`, optionally with the adapter name PEFT strips on save.
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_EMBED_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)"
                           r"(?:\.[^.]+)?$")
_UNSUPPORTED_PARTS = ("lora_magnitude_vector", "lora_E", "trainable_tokens", "ia3_", "vera_",
                      "hra_", "oft_", "boft_")

# adapter_config.json settings under which the update is not s·B·A on an existing base module
# (VeLoRA and BD-LoRA change training only, their weights are plain LoRA)
_VARIANTS = {
    "layer_replication": "an adapter with replicated layers",
    "alora_invocation_tokens": "activated LoRA (the update applies after its invocation tokens)",
    "use_qalora": "QA-LoRA (A acts on pooled inputs)",
    "lora_bias": "a LoRA with a trainable bias on lora_B",
    "arrow_config": "Arrow routing over LoRA experts",
    "monteclora_config": "MonteCLoRA (sampled updates)",
    "kasa_config": "KaSA (a learned diagonal between A and B)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings",
}


def is_adapter_dir(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def pattern_value(patterns: dict[str, int | float], module: str, default: float) -> float:
    """PEFT's rule: the first pattern `p` with `re.match(rf"(.*\\.)?({p})$", module)` wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module, mapped onto a base tensor."""

    module: str  # module path inside the adapted model, e.g. "encoder.layer.0.attention.self.query"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float  # s = alpha / r, or alpha / sqrt(r) with use_rslora
    transposed: bool  # fan_in_fan_out or embedding LoRA: the stored ΔW is (B A)ᵀ
    out_features: int  # rows of ΔW as stored in the base
    in_features: int


class LoraAdapter:
    """A PEFT LoRA adapter, its modules keyed by the base tensor name they update."""

    def __init__(self, directory: Path, config: dict, tensors: dict[str, TensorInfo],
                 modules: dict[str, LoraModule], extras: dict[str, str]) -> None:
        self.directory = directory
        self.config = config
        self.tensors = tensors
        self.modules = modules  # base tensor name -> module
        self.extras = extras  # base tensor name -> adapter key (modules_to_save, biases)
        self._fd: int | None = None

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @classmethod
    def open(cls, directory: Path, label: str, base_names: set[str]
             ) -> tuple[LoraAdapter | None, list[Problem]]:
        """Read config and header, reject what we cannot merge, map modules onto the base."""
        try:
            config = json.loads((directory / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            return None, [Problem(f"{ADAPTER_CONFIG} is not valid JSON: {exc}", model=label)]
        if not isinstance(config, dict):
            return None, [Problem(f"{ADAPTER_CONFIG} is not a JSON object", model=label)]
        problems = _config_problems(config, label)
        weights = directory / ADAPTER_WEIGHTS
        if not weights.is_file():
            hint = " (adapter_model.bin is not supported: save with safe_serialization)" \
                if (directory / "adapter_model.bin").is_file() else ""
            problems.append(Problem(f"{ADAPTER_WEIGHTS} is missing{hint}", model=label))
        if problems:
            return None, problems
        try:
            tensors = read_safetensors_header(weights)
        except SafetensorsFileError as exc:
            return None, [Problem(f"{ADAPTER_WEIGHTS}: {exc}", model=label)]

        factors: dict[str, dict[str, str]] = {}
        plain: dict[str, str] = {}  # module-relative name -> key
        for key in tensors:
            rel = key.removeprefix(_PEFT_PREFIX)
            if any(part in rel for part in _UNSUPPORTED_PARTS):
                kind = "DoRA" if "lora_magnitude_vector" in rel else "this PEFT variant"
                return None, [Problem(f"{kind} adapters are not supported (tensor {key})",
                                      model=label)]
            match = _FACTOR.match(rel) or _EMBED_FACTOR.match(rel)
            if match:
                factors.setdefault(match["module"], {})[match["kind"][-1]] = key
            else:
                # a wrapped layer's own parameters (bias "all" or "lora_only") are saved as
                # `<module>.base_layer.<name>`; the model names them `<module>.<name>`
                plain[rel.replace(".base_layer.", ".")] = key

        # adapters are saved relative to the model class they were trained on
        names = [f"{m}.weight" for m in factors] + list(plain)
        to_base = prefix_change(names, base_names)
        mapping = {n: to_base(n) for n in names}
        modules: dict[str, LoraModule] = {}
        for module, keys in sorted(factors.items()):
            if set(keys) != {"A", "B"}:
                problems.append(Problem(f"module {module} has only lora_{''.join(keys)}",
                                        model=label))
                continue
            a_info, b_info = tensors[keys["A"]], tensors[keys["B"]]
            embedding = "lora_embedding" in keys["A"]
            module_problem = _factor_shape_problem(module, a_info, b_info, embedding, label)
            if module_problem:
                problems.append(module_problem)
                continue
            r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
            rank = int(pattern_value(config.get("rank_pattern") or {}, module, r_default))
            alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, alpha_default))
            stored_rank = a_info.shape[0]  # lora_A and lora_embedding_A are both (r, in)
            if rank != stored_rank:
                problems.append(Problem(f"config gives rank {rank} for module {module}, "
                                        f"its lora_A has rank {stored_rank}", model=label))
                continue
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            transposed = embedding or bool(config.get("fan_in_fan_out"))
            if embedding:  # lora_embedding_A: (r, num_embeddings), lora_embedding_B: (dim, r)
                out_f, in_f = a_info.shape[1], b_info.shape[0]
            else:  # lora_A: (r, in), lora_B: (out, r); fan_in_fan_out stores W as (in, out)
                out_f, in_f = b_info.shape[0], a_info.shape[1]
                if transposed:
                    out_f, in_f = in_f, out_f
            target = mapping.get(f"{module}.weight", f"{module}.weight")
            modules[target] = LoraModule(module, keys["A"], keys["B"], rank, alpha, scale,
                                         transposed, out_f, in_f)
        extras = {mapping.get(rel, rel): key for rel, key in plain.items()}
        if problems:
            return None, problems
        return cls(directory, config, tensors, modules, extras), []

    def _tensor(self, key: str) -> torch.Tensor:
        if self._fd is None:
            self._fd = os.open(self.directory / ADAPTER_WEIGHTS, os.O_RDONLY)
        return read_tensor(self._fd, self.tensors[key])

    def factors(self, target: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with `ΔW = s · B @ A` in the base tensor's stored orientation."""
        m = self.modules[target]
        a, b = self._tensor(m.a_key), self._tensor(m.b_key)
        if m.transposed:  # stored ΔW = (B A)ᵀ = Aᵀ Bᵀ
            a, b = b.mT, a.mT
        return a, b, m.scale

    def extra(self, target: str) -> torch.Tensor:
        return self._tensor(self.extras[target])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _config_problems(config: dict, label: str) -> list[Problem]:
    problems = []
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        problems.append(Problem(f"peft_type {peft_type} is not supported (only LORA)",
                                model=label))
    if config.get("use_dora"):
        problems.append(Problem("DoRA adapters (use_dora: true) are not supported: their "
                                "magnitude vectors make the update non-linear in B·A",
                                model=label))
    for key, what in _VARIANTS.items():
        if config.get(key) not in (None, False, []):  # an empty config dict enables a variant
            problems.append(Problem(f"{what} ({key}: {json.dumps(config[key])[:60]}) is not "
                                    "supported: only plain LoRA, ΔW = s·B·A, can be merged",
                                    model=label))
    for key, integer in (("r", True), ("lora_alpha", False)):
        value = config.get(key)
        if value is not None and not _positive(value, integer):
            problems.append(Problem(f"{key} must be a positive {'integer' if integer else 'number'}"
                                    f", got {value!r}", model=label))
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            problems.append(Problem(f"{key} must be an object of module patterns, got "
                                    f"{json.dumps(patterns)[:60]}", model=label))
            continue
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(Problem(f"{key}: {pattern!r} is not a regex ({exc})",
                                        model=label))
            if not _positive(value, integer):
                problems.append(Problem(f"{key}: {pattern!r} must map to a positive "
                                        f"{'integer' if integer else 'number'}, got {value!r}",
                                        model=label))
    name = config.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        problems.append(Problem(f"base_model_name_or_path must be a string, got "
                                f"{json.dumps(name)[:60]}", model=label))
    return problems


def _positive(value: object, integer: bool) -> bool:
    """A positive finite number (an integer where `integer`); JSON's true is no number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if integer and isinstance(value, float) and not value.is_integer():  # 8.0 is a rank
        return False
    return math.isfinite(value) and value > 0


def _factor_shape_problem(module: str, a: TensorInfo, b: TensorInfo, embedding: bool,
                          label: str) -> Problem | None:
    if len(a.shape) != 2 or len(b.shape) != 2:
        return Problem(f"module {module}: only LoRA on Linear/Conv1D/Embedding layers is "
                       f"supported (lora_A has shape {list(a.shape)})", model=label)
    # lora_A (r, in) / lora_B (out, r); lora_embedding_A (r, num_embeddings) / _B (dim, r)
    if a.shape[0] != b.shape[1]:
        return Problem(f"module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                       "have different ranks", model=label)
    if not (a.is_float and b.is_float):
        return Problem(f"module {module}: LoRA factors must be floating point", model=label)
    return None
