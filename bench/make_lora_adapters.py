#!/usr/bin/env python3
"""Write the inputs of bench/lora_bench.py: synthetic PEFT LoRA adapters and base checkpoints.

Layouts (tensor names and shapes of the real models, `nn.Linear` weights stored out × in):

- Llama-3-8B: hidden 4096, intermediate 14336, 32 layers, 32 query heads / 8 key-value heads
  of dim 128 (q, o: 4096×4096; k, v: 1024×4096; gate, up: 14336×4096; down: 4096×14336),
  vocabulary 128256, untied lm_head; bfloat16.
- Llama-3.2-1B: hidden 2048, intermediate 8192, 16 layers, 32 / 8 heads of dim 64, tied
  embeddings.

Adapters (`adapter_config.json` + `adapter_model.safetensors`, PEFT's key names
`base_model.model.<module>.lora_{A,B}.weight`): r = 16, lora_alpha = 32 (scale 2), targets
q,k,v,o,gate,up,down of every generated layer, float32 (what PEFT saves for adapters it
trained in float32, e.g. 168 MB for r = 16 on Llama-3-8B). Both factors are non-zero:
A ~ N(0, 1/in) (r × in), B ~ N(0, 0.02²) (out × r), drawn from a CPU generator seeded by
(seed, task, module), so every adapter is identical on every run and machine, and the
layer-subset adapters hold exactly the tensors of the full ones for their layers.

Bases (what the merges need of the base; see bench/README.md):

- `base-8b`: every tensor of Llama-3-8B (291 tensors, 8.03 B parameters, bfloat16) in 4 shards
  with `model.safetensors.index.json`, written as SPARSE files: real safetensors headers, the
  data region a hole (reads as zeros, takes no disk). LoRA-in/LoRA-out `core` merges read
  only the headers (names, shapes) of a base; lora_bench.py checks that with the merge
  process's read byte count.
- `base-8b-2L`: real random weights (N(0, 0.02²), bfloat16) of the adapted Linear layers of
  layers 0 and 1 only (14 tensors, 0.87 GB): the base of the `full`/`knots`/`core`-with-full-
  output runs on a subset of layers, whose adapters are `adapters-8b-2L/task*`.
- `base-1b-<L>L`: the adapted Linear weights of the first L layers of Llama-3.2-1B, float32,
  sparse (all zeros): with a zero base, the `full`-output merge holds the merged ΔW itself,
  which the agreement check with PEFT reads.

Idempotent: every finished directory holds `.complete` (a JSON of its settings).

    python bench/make_lora_adapters.py --out bench/out/lora [--tasks 8] [--peft-layers 4]
    python bench/make_lora_adapters.py --out /tmp/tiny --tiny   # small shapes, for a dry run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

GENERATOR_VERSION = 1
RANK, LORA_ALPHA = 16, 32
B_STD, BASE_STD = 0.02, 0.02
MARKER = ".complete"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    """A Llama-architecture model: the shapes LoRA adapters of it have."""

    name: str  # the Hub id adapters and config name as their base
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each adapted projection."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def modules(self, layers: range) -> list[tuple[str, int, int]]:
        """(module path, out, in) of every adapted Linear in `layers`."""
        shapes = self.linear_shapes()
        out = []
        for layer in layers:
            for proj in PROJ:
                part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                out.append((f"model.layers.{layer}.{part}.{proj}", *shapes[proj]))
        return out

    def all_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of the model, in the order of the real checkpoint's files."""
        tensors: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}"
            tensors.append((f"{p}.input_layernorm.weight", (self.hidden,)))
            tensors += [(f"{m}.weight", (o, i)) for m, o, i in self.modules(range(layer,
                                                                               layer + 1))]
            tensors.append((f"{p}.post_attention_layernorm.weight", (self.hidden,)))
        tensors.append(("model.norm.weight", (self.hidden,)))
        if not self.tied:
            tensors.append(("lm_head.weight", (self.vocab, self.hidden)))
        return tensors

    def config(self) -> dict:
        """A `config.json` as `transformers.LlamaConfig` writes it for this layout."""
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            vocab_size=self.vocab, tie_word_embeddings=self.tied,
            max_position_embeddings=8192 if not self.tied else 131072, rope_theta=500000.0,
            rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
        data = cfg.to_dict()
        data["architectures"] = ["LlamaForCausalLM"]
        data["torch_dtype"] = "bfloat16"
        data["_name_or_path"] = self.name
        return data


LLAMA3_8B = Layout("meta-llama/Meta-Llama-3-8B", 4096, 14336, 32, 32, 8, 128, 128256, False)
LLAMA32_1B = Layout("meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 64, 128256, True)
# --tiny: the same code paths on shapes small enough for a dry run on a busy machine
TINY_8B = Layout("meta-llama/Meta-Llama-3-8B", 64, 224, 4, 4, 2, 16, 512, False)
TINY_1B = Layout("meta-llama/Llama-3.2-1B", 32, 128, 4, 4, 2, 8, 512, True)


def generator(seed: int, *parts: object) -> torch.Generator:
    digest = hashlib.sha256(repr((GENERATOR_VERSION, seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def lora_factors(seed: int, task: int, module: str, out_f: int, in_f: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: r × in, B: out × r), float32, both non-zero."""
    g = generator(seed, "lora", task, module)
    a = torch.randn(RANK, in_f, generator=g).div_(in_f ** 0.5)
    b = torch.randn(out_f, RANK, generator=g).mul_(B_STD)
    return a, b


def adapter_config(layout: Layout, layers: range) -> dict:
    """The `adapter_config.json` PEFT writes for a LoraConfig with these settings."""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": layout.name, "r": RANK, "lora_alpha": LORA_ALPHA,
        "target_modules": list(PROJ), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None,
    }
    if layers != range(layout.layers):
        config["layers_to_transform"] = list(layers)
        config["layers_pattern"] = "layers"
    return config


def write_adapter(directory: Path, layout: Layout, layers: range, task: int, seed: int) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, out_f, in_f in layout.modules(layers):
        a, b = lora_factors(seed, task, module, out_f, in_f)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(
        json.dumps(adapter_config(layout, layers), indent=2) + "\n")
    return sum(t.numel() for t in tensors.values())


_DTYPE_NAME = {torch.bfloat16: "BF16", torch.float32: "F32"}


def write_sparse_checkpoint(directory: Path, layout: Layout,
                            tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                            shard_bytes: int) -> int:
    """Real safetensors headers (and an index), every data region a hole of the right size:
    a valid checkpoint of all-zero weights that takes no disk space."""
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    itemsize = dtype.itemsize
    for name, shape in tensors:
        nbytes = itemsize * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else \
        [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards, strict=True):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard:
            nbytes = itemsize * _numel(shape)
            header[name] = {"dtype": _DTYPE_NAME[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        path = directory / fname
        with path.open("wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
        os.truncate(path, 8 + len(encoded) + offset)  # the hole: zeros, no blocks on disk
        total += offset
    if n > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(layout.config(), indent=2) + "\n")
    return total


def write_random_base(directory: Path, layout: Layout, layers: range, seed: int) -> int:
    """Random N(0, 0.02²) bfloat16 weights of the adapted Linear layers of `layers` only."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, out_f, in_f in layout.modules(layers):
        g = generator(seed, "base", module)
        tensors[f"{module}.weight"] = torch.randn(out_f, in_f, generator=g) \
            .mul_(BASE_STD).to(torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(layout.config(), indent=2) + "\n")
    return sum(t.numel() for t in tensors.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _done(directory: Path, settings: dict) -> bool:
    marker = directory / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == settings


def _finish(directory: Path, settings: dict) -> None:
    (directory / MARKER).write_text(json.dumps(settings) + "\n")


def make_all(out: Path, tasks: int, seed: int, peft_layers: int, tiny: bool) -> dict:
    """Write every input (skipping finished ones); return their paths."""
    big, small = (TINY_8B, TINY_1B) if tiny else (LLAMA3_8B, LLAMA32_1B)
    sub8 = range(min(2, big.layers))
    sub1 = range(min(peft_layers, small.layers))
    plan: list[tuple[str, dict, object]] = []
    for t in range(1, tasks + 1):
        plan.append((f"adapters-8b/task{t}", {"layers": big.layers},
                     lambda d, t=t: write_adapter(d, big, range(big.layers), t, seed)))
        plan.append((f"adapters-8b-2L/task{t}", {"layers": len(sub8)},
                     lambda d, t=t: write_adapter(d, big, sub8, t, seed)))
        plan.append((f"adapters-1b-{len(sub1)}L/task{t}", {"layers": len(sub1)},
                     lambda d, t=t: write_adapter(d, small, sub1, t, seed)))
    plan.append(("base-8b", {"sparse": True},
                 lambda d: write_sparse_checkpoint(d, big, big.all_tensors(), torch.bfloat16,
                                                   5 * 10**9 if not tiny else 10**5)))
    plan.append(("base-8b-2L", {"layers": len(sub8)},
                 lambda d: write_random_base(d, big, sub8, seed)))
    plan.append((f"base-1b-{len(sub1)}L", {"sparse": True, "layers": len(sub1)},
                 lambda d: write_sparse_checkpoint(
                     d, small, [(f"{m}.weight", (o, i)) for m, o, i in small.modules(sub1)],
                     torch.float32, 5 * 10**9)))
    for rel, extra, write in plan:
        directory = out / rel
        settings = {"version": GENERATOR_VERSION, "seed": seed, "rank": RANK,
                    "lora_alpha": LORA_ALPHA, "layout": asdict(big if "8b" in rel else small),
                    **extra}
        if _done(directory, settings):
            continue
        started = time.perf_counter()
        n = write(directory)  # type: ignore[operator]
        _finish(directory, settings)
        print(f"  wrote {rel}: {n:,} {'bytes (sparse)' if 'sparse' in extra else 'params'} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
    return {
        "adapters_8b": [out / f"adapters-8b/task{t}" for t in range(1, tasks + 1)],
        "adapters_8b_2L": [out / f"adapters-8b-2L/task{t}" for t in range(1, tasks + 1)],
        "adapters_1b": [out / f"adapters-1b-{len(sub1)}L/task{t}" for t in range(1, tasks + 1)],
        "base_8b": out / "base-8b", "base_8b_2L": out / "base-8b-2L",
        "base_1b": out / f"base-1b-{len(sub1)}L",
        "layout_8b": big, "layout_1b": small, "layers_2L": len(sub8), "layers_1b": len(sub1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "lora")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peft-layers", type=int, default=4,
                        help="layers of the Llama-3.2-1B adapters (PEFT comparison)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (dry run)")
    args = parser.parse_args(argv)
    make_all(args.out.resolve(), args.tasks, args.seed, args.peft_layers, args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
