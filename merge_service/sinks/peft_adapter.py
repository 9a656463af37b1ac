"""`lora` output: a PEFT adapter directory that `PeftModel.from_pretrained` loads onto the base.

Every module is written with `lora_alpha = r` (scale 1), so `ΔW = B' A'` exactly; modules
whose rank differs from the most common one get `rank_pattern`/`alpha_pattern` entries.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from merge_service.sinks.safetensors_writer import ShardedSafetensorsWriter
from merge_service.sources.lora import ADAPTER_CONFIG, LoraModule

_PEFT_PREFIX = "base_model.model."


def _module_keys(module: LoraModule) -> tuple[str, str]:
    """The PEFT keys of a module's (A, B) factors."""
    prefix = f"{_PEFT_PREFIX}{module.module}"
    if "lora_embedding" in module.a_key:
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


class PeftAdapterWriter:
    def __init__(self, directory: Path, template_config: dict, base_model: str,
                 modules: Iterable[LoraModule] = (), extra_keys: Iterable[str] = ()) -> None:
        """`modules` and `extra_keys`: what `add_module` and `add_tensor` will be given, where
        known in advance (the file's header space is reserved for them)."""
        expected = [*(key for m in modules for key in _module_keys(m)), *extra_keys]
        # PEFT reads one adapter_model.safetensors: never shard it
        self._writer = ShardedSafetensorsWriter(directory, "adapter_model", shard_bytes=2**62,
                                                expected=expected)
        self.directory = directory
        self.template = template_config
        self.base_model = base_model
        self.ranks: dict[str, int] = {}  # module path -> r'
        self.extra_keys: list[str] = []

    @property
    def total_bytes(self) -> int:
        return self._writer.total_bytes

    def add_module(self, module: LoraModule, a: torch.Tensor, b: torch.Tensor) -> None:
        """`(A', B')` with `ΔW = B' A'` in the base tensor's stored orientation."""
        a_key, b_key = _module_keys(module)
        if module.transposed:  # fan_in_fan_out or embedding: stored ΔW = (B A)ᵀ
            a, b = b.mT, a.mT
        self._writer.add(a_key, a.contiguous())
        self._writer.add(b_key, b.contiguous())
        self.ranks[module.module] = a.shape[0]

    def add_tensor(self, adapter_key: str, value: torch.Tensor) -> None:
        """A non-LoRA tensor the inputs carry (`modules_to_save`, biases), under its PEFT key."""
        self._writer.add(adapter_key, value)
        self.extra_keys.append(adapter_key)

    def finish(self) -> list[str]:
        files = self._writer.finish()
        common = Counter(self.ranks.values()).most_common(1)[0][0] if self.ranks else 1
        # whole module names, unescaped: PEFT >= 0.15 matches `(.*\.)?(pattern)$`, older PEFT
        # `.*\.pattern$` and then the name itself; an escaped dot would defeat that last lookup
        pattern = {m: r for m, r in sorted(self.ranks.items()) if r != common}
        config = {
            "peft_type": "LORA",
            "task_type": self.template.get("task_type"),
            "base_model_name_or_path": self.base_model,
            "r": common,
            "lora_alpha": common,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": sorted(self.ranks),
            "lora_dropout": 0.0,
            "fan_in_fan_out": bool(self.template.get("fan_in_fan_out", False)),
            "bias": "all" if any(k.endswith(".bias") for k in self.extra_keys
                                 if not self._is_saved_module(k)) else "none",
            "modules_to_save": self.template.get("modules_to_save"),
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        (self.directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return [*files, ADAPTER_CONFIG]

    def _is_saved_module(self, key: str) -> bool:
        saved = self.template.get("modules_to_save") or []
        module = key.removeprefix(_PEFT_PREFIX).rsplit(".", 1)[0]
        return any(module == s or module.endswith(f".{s}") for s in saved)
