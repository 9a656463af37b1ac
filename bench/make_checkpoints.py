#!/usr/bin/env python3
"""Write synthetic checkpoints with the exact Llama-3.2-1B tensor layout: a base + T task models.

Every tensor of every model has the name, shape and dtype (bfloat16) of meta-llama/Llama-3.2-1B
(hidden 2048, intermediate 8192, 16 layers, 32 query heads / 8 key-value heads of dim 64,
vocabulary 128256, tied embeddings: no `lm_head.weight`). 1,235,814,400 parameters, 2.47 GB
per model. The values are synthetic:

- base: matrices ~ N(0, 0.02²) (embed_tokens too), RMSNorm weights 1 + N(0, 0.02²);
- task t: θ_t = θ0 + Δ_t, with, for 2-D tensors, Δ_t = 0.01 · (A B) / sqrt(16) + 1e-3 · E
  (A: m×16, B: 16×n, E: m×n, all N(0, 1): a rank-16 "fine-tuning direction" with entries of
  std 0.01, plus dense noise of std 1e-3), and for 1-D tensors Δ_t = 1e-3 · E.
  Δ_t is added in float32 and the sum rounded to bfloat16, as a real bf16 fine-tune stores it.

Generation goes tensor by tensor: every value comes from a CPU generator seeded by
(seed, model, tensor name), so the output is identical on every run and machine; memory stays
around one float32 embedding matrix (1 GB). All T+1 models are written in one pass, each as
`model-0000i-of-0000N.safetensors` (~2 GB shards, tensors in the order of the real checkpoint)
plus `model.safetensors.index.json` and a `config.json` from `transformers.LlamaConfig`.

Idempotent: a finished directory holds `.bench-complete` (a JSON of the generation settings);
when it matches, nothing is regenerated. Usage:

    python bench/make_checkpoints.py [--out bench/out/llama1b] [--tasks 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

GENERATOR_VERSION = 1
HIDDEN, INTERMEDIATE, LAYERS = 2048, 8192, 16
HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 8, 64, 128256
SHARD_BYTES = 2 * 10**9
LOW_RANK, LOW_RANK_STD, NOISE_STD, BASE_STD = 16, 0.01, 1e-3, 0.02
MARKER = ".bench-complete"


def llama_3_2_1b_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of Llama-3.2-1B, in the order of its safetensors file."""
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        tensors += [
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
            (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"{p}.self_attn.k_proj.weight", (kv, HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, q)),
            (f"{p}.self_attn.q_proj.weight", (q, HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (kv, HIDDEN)),
        ]
    tensors.append(("model.norm.weight", (HIDDEN,)))
    return tensors


def write_config(directory: Path) -> None:
    """config.json of Llama-3.2-1B through transformers' own LlamaConfig."""
    values = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, hidden_act="silu", max_position_embeddings=131072,
        initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True, tie_word_embeddings=True,
        rope_theta=500000.0, attention_bias=False, attention_dropout=0.0, mlp_bias=False,
        bos_token_id=128000, eos_token_id=128001, pretraining_tp=1,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        architectures=["LlamaForCausalLM"],
    )
    from transformers import LlamaConfig

    try:
        config = LlamaConfig(**values, dtype="bfloat16")  # transformers >= 5
    except TypeError:
        config = LlamaConfig(**values, torch_dtype="bfloat16")
    config.to_json_file(str(directory / "config.json"))
    # transformers 5 writes `dtype`; older readers (and mergekit) may look for `torch_dtype`
    data = json.loads((directory / "config.json").read_text())
    data.setdefault("torch_dtype", "bfloat16")
    data.setdefault("dtype", "bfloat16")
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def generator(seed: int, model: str, name: str, part: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{model}\0{name}\0{part}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def base_tensor(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, generator=generator(seed, "base", name, "w"), dtype=torch.float32)
    x.mul_(BASE_STD)
    if len(shape) == 1:
        x.add_(1.0)  # RMSNorm weights sit around 1
    return x.to(torch.bfloat16)


def task_tensor(seed: int, task: int, name: str, base: torch.Tensor) -> torch.Tensor:
    model = f"task{task}"
    out = torch.randn(base.shape, generator=generator(seed, model, name, "noise"),
                      dtype=torch.float32).mul_(NOISE_STD)
    if base.dim() == 2:
        m, n = base.shape
        a = torch.randn((m, LOW_RANK), generator=generator(seed, model, name, "A"))
        b = torch.randn((LOW_RANK, n), generator=generator(seed, model, name, "B"))
        out.addmm_(a, b, alpha=LOW_RANK_STD / math.sqrt(LOW_RANK))
    out.add_(base)  # float32 + bf16 -> float32
    return out.to(torch.bfloat16)


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple]]]:
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def header_bytes(shard: list[tuple[str, tuple]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shard:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_bytes(fh, tensor: torch.Tensor) -> None:
    fh.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


def settings(tasks: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "layout": "Llama-3.2-1B", "tasks": tasks,
            "seed": seed, "dtype": "bfloat16", "low_rank": LOW_RANK,
            "low_rank_std": LOW_RANK_STD, "noise_std": NOISE_STD, "base_std": BASE_STD,
            "shard_bytes": SHARD_BYTES}


def model_dirs(out: Path, tasks: int) -> list[Path]:
    return [out / "base"] + [out / f"task{t}" for t in range(1, tasks + 1)]


def is_complete(out: Path, tasks: int, seed: int) -> bool:
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text())
    except ValueError:
        return False
    return done == settings(tasks, seed) and all(
        (d / "model.safetensors.index.json").is_file() for d in model_dirs(out, tasks))


def generate(out: Path, tasks: int, seed: int) -> None:
    tensors = llama_3_2_1b_tensors()
    shards = plan_shards(tensors)
    n = len(shards)
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    dirs = model_dirs(out, tasks)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    for d in dirs:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        write_config(d)
        weight_map = {name: fname for shard, fname in zip(shards, names, strict=True)
                      for name, _ in shard}
        total = sum(math.prod(s) * 2 for _, s in tensors)
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

    started = time.perf_counter()
    done, count = 0, len(tensors)
    for shard, fname in zip(shards, names, strict=True):
        head = header_bytes(shard)
        handles = [(d / fname).open("wb") for d in dirs]
        try:
            for fh in handles:
                fh.write(head)
            for name, shape in shard:
                base = base_tensor(seed, name, shape)
                write_bytes(handles[0], base)
                for t in range(1, tasks + 1):
                    write_bytes(handles[t], task_tensor(seed, t, name, base))
                done += 1
                if done % 20 == 0 or done == count:
                    print(f"  {done}/{count} tensors ({time.perf_counter() - started:.0f} s)",
                          file=sys.stderr, flush=True)
        finally:
            for fh in handles:
                fh.close()
    (out / MARKER).write_text(json.dumps(settings(tasks, seed), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=here / "out" / "llama1b")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    args = parser.parse_args(argv)
    if not args.force and is_complete(args.out, args.tasks, args.seed):
        print(f"checkpoints already present in {args.out} (marker {MARKER}); skipping")
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"writing base + {args.tasks} task models (Llama-3.2-1B layout, bf16) to {args.out}")
    started = time.perf_counter()
    generate(args.out, args.tasks, args.seed)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
