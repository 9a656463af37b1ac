"""The model families AdaRank can score (METHODS.md section 12, step 4) and their `f_t`.

- **Sequence classification with per-task heads.** The merged encoder is the base loaded with
  `AutoModel`; task t's head is a linear layer in `head.safetensors` (tensors `weight`, C × H,
  and optionally `bias`, C; a single prefix such as `classifier.` is allowed) found in the task
  model's directory or, for an adapter saved as `<task>/adapter/`, beside it in `<task>/`. The
  head reads the mean of the encoder's last hidden states over the non-padding tokens, or the
  first token's state when the file's metadata says `{"pooling": "cls"}`.
  Alternatively the base is itself a `*ForSequenceClassification` checkpoint: then each task
  model carries its own head tensors (`classifier.*` or `score.*`, as full-checkpoint tensors
  or adapter `modules_to_save`), and `f_t` is the model's own forward with task t's head.
- **Causal language models** (`*ForCausalLM`): `f_t` is the next-token distribution at every
  non-padding position of task t's inputs.

Inputs are tokenized with the base's tokenizer, truncated to `MAX_TOKENS` (or the model's
own limit when it is lower).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from merge_service.errors import Problem
from merge_service.inputs import TaskInput
from merge_service.sources.checkpoint import SafetensorsFileError, read_safetensors_header
from merge_service.sources.names import prefix_change

HEAD_FILE = "head.safetensors"
HEAD_PREFIXES = ("classifier.", "score.")  # head tensors of *ForSequenceClassification models
MAX_TOKENS = 512
Kind = Literal["sequence_classification", "causal_lm"]


@dataclass(frozen=True)
class HeadFile:
    """A task's linear classification head on pooled encoder states."""

    path: Path
    weight_key: str
    bias_key: str | None
    pooling: str  # mean | cls

    def load(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                      torch.Tensor | None]:
        from safetensors.torch import load_file

        tensors = load_file(self.path)
        weight = tensors[self.weight_key].to(device, dtype)
        bias = tensors[self.bias_key].to(device, dtype) if self.bias_key else None
        return weight, bias


@dataclass(frozen=True)
class ModelFamily:
    kind: Kind
    auto_class: str  # the transformers Auto class that loads the base for the forward
    heads: dict[str, HeadFile] | None = None  # per task: external heads
    head_tensors: tuple[str, ...] = ()  # built-in heads: base tensor names of the head

    def describe(self) -> str:
        if self.kind == "causal_lm":
            return "causal language model (next-token entropy at every non-padding position)"
        where = HEAD_FILE if self.heads is not None else ", ".join(self.head_tensors)
        return f"sequence classification with per-task heads ({where})"


def find_head(directory: Path) -> Path | None:
    """`head.safetensors` in the task's directory, else in its parent (`<task>/adapter/`)."""
    for candidate in (directory / HEAD_FILE, directory.parent / HEAD_FILE):
        if candidate.is_file():
            return candidate
    return None


def read_head(path: Path, task: str, hidden: int | None) -> tuple[HeadFile | None, list[Problem]]:
    try:
        infos = read_safetensors_header(path)
    except SafetensorsFileError as exc:
        return None, [Problem(f"classification head {path}: {exc}", model=task)]
    weights = [k for k in infos if k == "weight" or k.endswith(".weight")]
    biases = [k for k in infos if k == "bias" or k.endswith(".bias")]
    if len(weights) != 1 or len(biases) > 1:
        return None, [Problem(f"classification head {path} must hold one linear layer "
                              f"(`weight` and optionally `bias`), found {sorted(infos)}",
                              model=task)]
    weight = infos[weights[0]]
    bias = infos[biases[0]] if biases else None
    if len(weight.shape) != 2 or not weight.is_float:
        return None, [Problem(f"classification head {path}: weight must be a 2-D float tensor "
                              f"(labels × hidden), got shape {list(weight.shape)}", model=task)]
    labels, width = weight.shape
    problems = []
    if hidden is not None and width != hidden:
        problems.append(Problem(f"classification head {path} reads {width} features, the base's "
                                f"hidden size is {hidden}", model=task))
    if bias is not None and bias.shape != (labels,):
        problems.append(Problem(f"classification head {path}: bias has shape "
                                f"{list(bias.shape)}, expected [{labels}]", model=task))
    pooling = _head_metadata(path).get("pooling", "mean")
    if pooling not in {"mean", "cls"}:
        problems.append(Problem(f"classification head {path}: pooling {pooling!r} is not "
                                "supported (mean or cls)", model=task))
    if problems:
        return None, problems
    return HeadFile(path, weights[0], biases[0] if biases else None, pooling), []


def _head_metadata(path: Path) -> dict[str, str]:
    import struct

    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _architecture_names(mapping: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def detect_family(base_path: Path, inputs: Sequence[TaskInput], base_tensors: Iterable[str]
                  ) -> tuple[ModelFamily | None, Any, list[Problem]]:
    """The family of the base and the tasks' heads; the base's config; every problem."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto as auto

    try:
        config = AutoConfig.from_pretrained(base_path)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, None, [Problem(f"unsupported architecture: adarank loads the base with "
                                    f"transformers, which cannot read its config ({reason})",
                                    model="base")]
    architectures = set(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "?")
    causal = bool(architectures & _architecture_names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    classifier = bool(architectures
                      & _architecture_names(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES))
    head_paths = {t.name: find_head(t.source.path) for t in inputs}
    problems: list[Problem] = []

    if any(head_paths.values()) or not (causal or classifier):
        if model_type not in auto.MODEL_MAPPING_NAMES:
            return None, config, [Problem(
                f"unsupported architecture {model_type!r} ({', '.join(sorted(architectures))}): "
                "adarank needs a causal language model (*ForCausalLM) or an encoder that "
                "transformers' AutoModel loads, with a classification head per task",
                model="base")]
        heads: dict[str, HeadFile] = {}
        hidden = getattr(config, "hidden_size", None)
        for task in inputs:
            path = head_paths[task.name]
            if path is None:
                problems.append(Problem(
                    f"no classification head found for this task: expected {HEAD_FILE} in "
                    f"{task.source.path} or {task.source.path.parent} (the base "
                    f"{', '.join(sorted(architectures)) or model_type} is not a causal LM, so "
                    "adarank scores it as a sequence classifier with per-task heads)",
                    model=task.name))
                continue
            head, head_problems = read_head(path, task.name, hidden)
            problems += head_problems
            if head is not None:
                heads[task.name] = head
        family = ModelFamily("sequence_classification", "AutoModel", heads=heads)
    elif classifier:
        head_tensors = tuple(n for n in base_tensors if n.startswith(HEAD_PREFIXES))
        for task in inputs:
            missing = [n for n in head_tensors if not task.touches(n)]
            if missing or not head_tensors:
                problems.append(Problem(
                    "no classification head found for this task: the base is a "
                    f"{', '.join(sorted(architectures))}, so each task model must carry its own "
                    f"head tensors ({', '.join(missing) or 'classifier.* or score.*'}), or a "
                    f"{HEAD_FILE} must sit in {task.source.path}", model=task.name))
        family = ModelFamily("sequence_classification", "AutoModelForSequenceClassification",
                             head_tensors=head_tensors)
    else:
        family = ModelFamily("causal_lm", "AutoModelForCausalLM")
    return family, config, problems


def model_keys(family: ModelFamily, config: Any) -> set[str]:
    """The state-dict keys of the model the forward runs, built on the meta device."""
    import transformers

    cls = getattr(transformers, family.auto_class)
    with torch.device("meta"):
        model = cls.from_config(config)
    return set(model.state_dict().keys())


def parameter_mapping(names: Iterable[str], keys: set[str]) -> dict[str, str]:
    """Checkpoint tensor name -> model state-dict key, for the names one prefix change places
    (`prefix_change`: a `BertForSequenceClassification` checkpoint run as `BertModel`)."""
    names = list(names)
    best = prefix_change(names, keys)
    return {n: best(n) for n in names if best(n) in keys}


class Objective:
    """`mean_x H(softmax(f_t(x; θ)))` for one task and a batch of its texts."""

    def __init__(self, family: ModelFamily, base_path: Path, inputs: Sequence[TaskInput],
                 device: torch.device, dtype: torch.dtype) -> None:
        import transformers
        from transformers import AutoTokenizer

        self.family = family
        self.device, self.dtype = device, dtype
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        cls = getattr(transformers, family.auto_class)
        self.model = cls.from_pretrained(base_path, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        limits = [MAX_TOKENS, getattr(self.model.config, "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        self.max_length = min(int(x) for x in limits if isinstance(x, int) and x > 0)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0  # padded positions are masked out
        self.heads: list[tuple[torch.Tensor, torch.Tensor | None, str]] = []
        if family.heads is not None:
            for task in inputs:
                head = family.heads[task.name]
                self.heads.append((*head.load(device, dtype), head.pooling))
        # built-in heads: per task, model key -> task t's own head tensor (set by the caller)
        self.head_params: list[dict[str, torch.Tensor]] = []

    def state(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by state-dict key (tied weights appear once per
        name, sharing storage)."""
        return dict(self.model.state_dict(keep_vars=False))

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded `input_ids` and `attention_mask` (B × L) on the device."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                 padding=False)["input_ids"]
        length = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for i, row in enumerate(encoded):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def entropy(self, task: int, params: dict[str, torch.Tensor],
                batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The mean entropy of `f_t` over the batch (0-d, differentiable in `params`)."""
        from torch.func import functional_call

        input_ids, mask = batch
        kwargs = {"input_ids": input_ids, "attention_mask": mask}
        if self.family.kind == "causal_lm":
            logits = functional_call(self.model, params, (), {**kwargs, "use_cache": False}
                                     ).logits  # B × L × V
            keep = mask.bool()
            return _entropy(logits[keep]).mean()  # every non-padding position is one x
        if self.head_params:  # the model's own head, with task t's head tensors
            logits = functional_call(self.model, {**params, **self.head_params[task]}, (),
                                     kwargs).logits
            return _entropy(logits).mean()
        hidden = functional_call(self.model, params, (), kwargs).last_hidden_state  # B × L × H
        weight, bias, pooling = self.heads[task]
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        logits = pooled @ weight.mT
        if bias is not None:
            logits = logits + bias
        return _entropy(logits).mean()


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """`H(softmax(z)) = −Σ p log p` over the last dimension."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
