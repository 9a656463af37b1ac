#!/usr/bin/env python3
"""Benchmark: LoRA-native merging (issue 3) on Llama-3-8B-shaped adapters, and PEFT side by side.

Inputs (bench/make_lora_adapters.py, under --out): 8 synthetic PEFT LoRA adapters, r = 16,
q,k,v,o,gate,up,down of all 32 layers of Llama-3-8B, float32; their layer-0/1 subsets; a
sparse Llama-3-8B base (headers only: a LoRA-out merge needs no base weights); a real
bfloat16 base of the adapted Linear layers of layers 0 and 1; Llama-3.2-1B-shaped adapters
of the first --peft-layers layers.

Phases (`--phases`, default all; each run's measurement is stored in --out/runs.json, so
phases can run separately and the report is built from every stored run):

- `core`: `tsv` and `task_arithmetic` in `core` space with `lora` output (float32) on all 32
  layers, and the I/O floor: a child process that reads the 8 adapters with
  `safetensors.torch.load_file` and writes one rank-128 adapter (the concatenation
  [A_1; …; A_8], [s B_1 … s B_8], i.e. the exact task-arithmetic adapter) with `save_file`.
  Goal: every core merge within 3x of the floor, peak RSS < 4 GB. The merge processes'
  read byte count (/proc/self/io `rchar`, counted after the imports) shows whether the base's
  tensors are read: they must not be (the base is 16 GB).
- `subset`: `tsv` in `knots` and in `core` space with `full` output (bfloat16) on layer 0 and
  on layers 0-1 (`options.include`), extrapolated to 32 layers: t32 = t2 + 30·(t2 − t1).
- `full`: `tsv` in `full` space on single modules of layer 0 (a full layer would take about an
  hour on 2 cores): R1 = {k}, R2 = {k, v}, R3 = {k, v, q}, R4 = {k, v, gate}. Per module:
  Δk = R2 − R1, Δq = R3 − R2, Δgate = R4 − R2; fixed cost t0 = R1 − Δk; one layer =
  2Δq + 2Δk + 3Δgate (o has q's shape, v k's, up gate's, down gate's transpose: the same SVD
  cost); t32 = t0 + 32 · layer. `core` with full output runs on R3 and R4 too (like for like).
- `peft`: one child process builds a random-init `transformers.LlamaForCausalLM` at the
  Llama-3.2-1B config (float32), loads the 8 Llama-3.2-1B-shaped adapters with PEFT and times
  `add_weighted_adapter` (`svd`, `ties_svd` with density 0.2); then, in the same process,
  times ours through `run_merge` (the library's one entry point) on the same adapter
  directories: task_arithmetic / tsv / ties in core space with lora output (ranks 128 and,
  with `target_rank: 16`, PEFT's rank), and ties in full space; then compares the ΔW of
  every module (see `agreement` below and bench/README.md).

Measurement: every run is a child process measured by bench/run_merge_bench.py's `measure`
(wall from spawn to exit; peak RSS = `ru_maxrss` from `os.wait4`; page cache dropped before
each run where permitted, else every input read once first). Rounds interleave the runs;
the table shows the best wall time and the highest peak RSS of the rounds.

    python bench/lora_bench.py                       # everything
    python bench/lora_bench.py --phases core,subset  # some phases; the report uses all runs
    python bench/lora_bench.py --tiny --out /tmp/lora-tiny --results /tmp/lora-tiny/results
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

TASKS = 8
RANK = 16
TIES_DENSITY = 0.2
RSS_GOAL = 4 * 10**9
FLOOR_GOAL = 3.0
SPEEDUP_GOAL = 100.0
# Published reference figures (issue 3, "Benchmark"): a method that forms every ΔW takes
# ~4 s per Llama-3-8B layer for 8 rank-16 adapters; full-space TSV 5.5 min per 4096×4096.
REFERENCE_PER_LAYER_S = 4.0
REFERENCE_FULL_TSV_4096_S = 330.0


# --------------------------------------------------------------------------- child modes

def _proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key.strip()] = int(value)
    return out


def child_cli(io_path: str, argv: list[str]) -> int:
    """`merge-service ARGV` in this process, recording the bytes read after the imports."""
    from merge_service import cli

    cli.build_parser()  # imports everything the command line loads (api.cli included)
    import merge_service.engine  # noqa: F401

    before = _proc_io()

    def dump() -> None:
        after = _proc_io()
        Path(io_path).write_text(json.dumps(
            {k: after[k] - before.get(k, 0) for k in after}) + "\n")

    atexit.register(dump)
    return cli.main(argv)


def child_floor(io_path: str, out_dir: str, adapters: list[str]) -> int:
    """The I/O floor: read the adapters, write one rank-Σr adapter (their concatenation)."""
    import torch
    from safetensors.torch import load_file, save_file

    started = time.perf_counter()
    loaded = [load_file(str(Path(a) / "adapter_model.safetensors")) for a in adapters]
    configs = [json.loads((Path(a) / "adapter_config.json").read_text()) for a in adapters]
    read_s = time.perf_counter() - started
    merged: dict[str, torch.Tensor] = {}
    for key in loaded[0]:
        if ".lora_A." in key:
            merged[key] = torch.cat([t[key] for t in loaded], dim=0)
        elif ".lora_B." in key:
            merged[key] = torch.cat([t[key] * (c["lora_alpha"] / c["r"])
                                     for t, c in zip(loaded, configs, strict=True)], dim=1)
    rank = sum(c["r"] for c in configs)
    del loaded
    concat_s = time.perf_counter() - started - read_s
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(
        {**configs[0], "r": rank, "lora_alpha": rank}, indent=2) + "\n")
    write_s = time.perf_counter() - started - read_s - concat_s
    Path(io_path).write_text(json.dumps({
        "read_s": read_s, "concat_s": concat_s, "write_s": write_s, "rank": rank,
        "bytes_written": sum(t.numel() * t.element_size() for t in merged.values()),
        **_proc_io()}) + "\n")
    return 0


def child_peft(job_path: str) -> int:
    """PEFT's add_weighted_adapter and ours on the same adapters, in this one process."""
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from merge_service.engine import run_merge
    from merge_service.spec import spec_from_dict

    job = json.loads(Path(job_path).read_text())
    adapters, names = job["adapters"], [f"task{t + 1}" for t in range(len(job["adapters"]))]
    work = Path(job["work"])
    result: dict = {"timings_s": {}, "settings": {}}
    torch.manual_seed(0)
    started = time.perf_counter()
    config = LlamaConfig.from_dict(json.loads((Path(job["base"]) / "config.json").read_text()))
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    result["timings_s"]["peft_build_model"] = time.perf_counter() - started
    result["settings"]["model_params"] = sum(p.numel() for p in model.parameters())

    started = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for path, name in zip(adapters[1:], names[1:], strict=True):
        peft_model.load_adapter(path, adapter_name=name)
    result["timings_s"]["peft_load_adapters"] = time.perf_counter() - started

    full_matrices = bool(job["svd_full_matrices"])
    result["settings"]["svd_full_matrices"] = full_matrices
    peft_out: dict[str, Path] = {}
    for combo in ("svd", "ties_svd"):
        kwargs = {"density": TIES_DENSITY} if combo == "ties_svd" else {}
        print(f"peft add_weighted_adapter {combo} ...", flush=True)
        started = time.perf_counter()
        peft_model.add_weighted_adapter(names, [1.0] * len(names), f"m_{combo}",
                                        combination_type=combo,
                                        svd_full_matrices=full_matrices, **kwargs)
        result["timings_s"][f"peft_{combo}"] = time.perf_counter() - started
        tensors = {}
        for module_name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and f"m_{combo}" in module.lora_A:
                scale = module.scaling[f"m_{combo}"]
                rel = module_name.removeprefix("base_model.model.")
                a, b = module.lora_A[f"m_{combo}"].weight, module.lora_B[f"m_{combo}"].weight
                tensors[f"{rel}.A"] = a.detach().contiguous()
                tensors[f"{rel}.B"] = (b.detach() * scale).contiguous()
        peft_out[combo] = work / f"peft-{combo}.safetensors"
        save_file(tensors, str(peft_out[combo]))
        peft_model.delete_adapter(f"m_{combo}")
    del peft_model, model

    ours: dict[str, Path] = {}
    for label, method, params, space, fmt in job["ours"]:
        out = work / f"ours-{label}"
        if out.exists():
            shutil.rmtree(out)
        spec = spec_from_dict({
            "name": label, "base": job["base"],
            "models": [{"source": a, "name": n} for a, n in zip(adapters, names, strict=True)],
            "method": {"name": method, "params": params}, "space": space,
            "output": {"format": fmt, "destination": str(out), "dtype": "float32"},
            "options": {"device": "cpu", "compute_dtype": "float32"}})
        print(f"ours {label} ...", flush=True)
        started = time.perf_counter()
        report = run_merge(spec).report
        result["timings_s"][f"ours_{label}"] = time.perf_counter() - started
        result["timings_s"][f"ours_{label}_merge_s"] = report["timings_s"]["merge_s"]
        ours[label] = out

    print("agreement ...", flush=True)
    result["agreement"] = agreement(peft_out, ours, adapters)
    result["peak_rss_bytes_child"] = _maxrss_self()
    Path(job["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _maxrss_self() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- agreement

def _lora_delta(directory: Path) -> dict[str, object]:
    """ΔW = s · B A of every module of a PEFT adapter directory (module path -> tensor)."""
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        leaf = module
        rank = next((v for p, v in (config.get("rank_pattern") or {}).items()
                     if re.match(rf"(.*\.)?({p})$", leaf)), config["r"])
        alpha = next((v for p, v in (config.get("alpha_pattern") or {}).items()
                      if re.match(rf"(.*\.)?({p})$", leaf)), config["lora_alpha"])
        assert rank == r, (module, rank, r)
        out[module] = (b.double() @ a.double()) * (alpha / rank)
    return out


def _full_delta(directory: Path, modules: list[str]) -> dict[str, object]:
    """The merged weights of a full-output merge on a zero base: ΔW itself."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                module = key.removesuffix(".weight")
                if module in modules:
                    out[module] = f.get_tensor(key).double()
    return out


def _peft_delta(path: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {k[:-2]: tensors[k[:-2] + ".B"].double() @ v.double()
            for k, v in tensors.items() if k.endswith(".A")}


def agreement(peft_out: dict[str, Path], ours: dict[str, Path], adapters: list[str]) -> dict:
    """Per module relative Frobenius differences ‖X − Y‖_F / ‖Y‖_F of the merged ΔW (float64
    from the stored float32 factors); summarized as max and median over modules."""
    import torch

    def svd_k(x: torch.Tensor, k: int) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return (u[:, :k] * s[:k]) @ vh[:k]

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))

    peft_svd, peft_ties = _peft_delta(peft_out["svd"]), _peft_delta(peft_out["ties_svd"])
    modules = sorted(peft_svd)
    ta_r16 = _lora_delta(ours["ta_core_r16"])
    ta_full_rank = _lora_delta(ours["ta_core"])
    ties_core_r16 = _lora_delta(ours["ties_core_r16"])
    ties_core = _lora_delta(ours["ties_core"])
    ties_full = _full_delta(ours["ties_full"], modules)
    per_module: dict[str, dict[str, float]] = {}
    for m in modules:
        ties_full_r16 = svd_k(ties_full[m], RANK)
        per_module[m] = {
            # same operator on both sides: must agree to float32 rounding
            "svd_vs_ours_ta_core_target_rank16": rel(peft_svd[m], ta_r16[m]),
            "ties_svd_vs_svd16_of_ours_ties_full": rel(peft_ties[m], ties_full_r16),
            # what the rank-16 truncation loses of the exact results
            "ours_ta_core_r16_vs_ours_ta_core_exact": rel(ta_r16[m], ta_full_rank[m]),
            "svd16_of_ours_ties_full_vs_ours_ties_full": rel(ties_full_r16, ties_full[m]),
            # different operators: TIES on core coordinates vs TIES on ΔW entries
            "ties_svd_vs_ours_ties_core_target_rank16": rel(peft_ties[m], ties_core_r16[m]),
            "ours_ties_core_vs_ours_ties_full": rel(ties_core[m], ties_full[m]),
            "ties_svd_vs_ours_ties_core": rel(peft_ties[m], ties_core[m]),
        }
    summary = {}
    for key in next(iter(per_module.values())):
        values = [v[key] for v in per_module.values()]
        summary[key] = {"max": max(values), "median": statistics.median(values),
                        "min": min(values)}
    return {"definition": "per module: ||dW_x - dW_y||_F / ||dW_y||_F (y = the second named), "
                          "dW = s * B @ A in float64; max/median/min over modules",
            "modules": len(modules), "summary": summary, "per_module": per_module}


# --------------------------------------------------------------------------- specs

def merge_spec(name: str, method: str, base: Path, adapters: list[Path], out: Path, *,
               space: str, fmt: str, include: list[str] | None = None) -> dict:
    spec: dict = {
        "name": name, "base": str(base),
        "models": [{"source": str(a), "name": a.name} for a in adapters],
        "method": {"name": method, "params": {"alpha": 1.0}},
        "space": space,
        "output": {"format": fmt, "destination": str(out),
                   "dtype": "float32" if fmt == "lora" else "bfloat16"},
        "options": {"device": "cpu", "compute_dtype": "float32"},
    }
    if include:
        spec["options"]["include"] = include
    return spec


# --------------------------------------------------------------------------- runner

class Runner:
    """Runs measured child processes and keeps every measurement in runs.json."""

    def __init__(self, out: Path, cache: str, repeat: int) -> None:
        from run_merge_bench import drop_caches

        self.out = out
        self.work = out / "work"
        self.store = out / "runs.json"
        self.runs: dict[str, dict] = json.loads(self.store.read_text()) \
            if self.store.is_file() else {}
        if cache == "auto":
            cache = "cold" if drop_caches() else "warm"
        self.cache = cache
        self.repeat = repeat

    def run(self, key: str, label: str, command: list[str], inputs: list[Path],
            output: Path | None, rounds: int | None = None, extra: dict | None = None) -> dict:
        from run_merge_bench import Measurement, measure

        rounds = self.repeat if rounds is None else rounds
        done = []
        for round_ in range(1, rounds + 1):
            if output is not None and output.exists():
                shutil.rmtree(output)
            io_path = self.work / "io" / f"{key}.{round_}.json"
            io_path.parent.mkdir(parents=True, exist_ok=True)
            io_path.unlink(missing_ok=True)
            cmd = [c.replace("{IO}", str(io_path)) for c in command]
            m = Measurement(label, "ours", key, f"round{round_}", cmd,
                            output=str(output or ""))
            m.repeat = round_
            print(f"running {label} (round {round_}/{rounds}) ...", flush=True)
            measure(m, self.work / "logs" / f"{key}.{round_}.log", self.cache, inputs)
            ok = m.returncode == 0
            print(f"  {m.wall_s:.1f} s, peak RSS {m.peak_rss_bytes / 1e9:.2f} GB, other load "
                  f"{m.other_cpu_cores:.2f} cores: {'ok' if ok else f'FAILED (see {m.log})'}",
                  flush=True)
            rec = asdict(m)
            rec["io"] = json.loads(io_path.read_text()) if io_path.is_file() else None
            report = (output / "merge_report.json") if output else None
            if report is not None and report.is_file():
                r = json.loads(report.read_text())
                rec["merge_report_timings_s"] = r.get("timings_s")
                rec["output_bytes"] = r.get("output", {}).get("bytes")
            done.append(rec)
        good = [r for r in done if r["returncode"] == 0]
        best = min(good, key=lambda r: r["wall_s"]) if good else done[-1]
        entry = {
            "label": label, "ok": bool(good) and len(good) == len(done),
            "wall_s": best["wall_s"], "cpu_s": best["user_s"] + best["sys_s"],
            "peak_rss_bytes": max((r["peak_rss_bytes"] for r in good), default=0),
            "rounds_wall_s": [round(r["wall_s"], 2) for r in done],
            "rounds_other_cpu_cores": [r["other_cpu_cores"] for r in done],
            "io": best.get("io"), "merge_report_timings_s": best.get("merge_report_timings_s"),
            "output_bytes": best.get("output_bytes"), "cache": self.cache,
            "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": best["command"], "log": best["log"], "commit": code_version(),
            **(extra or {}),
        }
        self.runs[key] = entry
        self.store.write_text(json.dumps(self.runs, indent=2) + "\n")
        return entry


def cli_command(spec_path: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_cli", "{IO}", "--", "merge",
            str(spec_path), "--overwrite", "-q"]


def write_spec(path: Path, spec: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def adapter_bytes(adapters: list[Path]) -> int:
    return sum((a / "adapter_model.safetensors").stat().st_size for a in adapters)


# --------------------------------------------------------------------------- phases

def phase_core(runner: Runner, inputs: dict) -> None:
    adapters, base = inputs["adapters_8b"], inputs["base_8b"]
    work = runner.work
    specs = {
        "core_tsv_lora": ("ours tsv, core, lora out (32 layers)", "tsv"),
        "core_ta_lora": ("ours task_arithmetic, core, lora out (32 layers)", "task_arithmetic"),
    }
    for round_ in range(runner.repeat):  # interleave: drift hits every run alike
        for key, (label, method) in specs.items():
            out = work / key
            spec = write_spec(work / "specs" / f"{key}.yaml", merge_spec(
                key, method, base, adapters, out, space="core", fmt="lora"))
            runner.run(f"{key}.r{round_}", label, cli_command(spec), adapters, out,
                       rounds=1, extra={"method": method})
            shutil.rmtree(out, ignore_errors=True)
        out = work / "floor"
        runner.run(f"floor.r{round_}", "I/O floor: read 8 adapters, write rank-128 adapter",
                   [sys.executable, str(Path(__file__).resolve()), "_floor", "{IO}", str(out),
                    *map(str, adapters)], adapters, out, rounds=1)
        shutil.rmtree(out, ignore_errors=True)


def _layer_include(layers: int) -> list[str]:
    return [r"^model\.layers\.0\."] if layers == 1 else [rf"^model\.layers\.[0-{layers - 1}]\."]


def _module_include(projs: list[str]) -> list[str]:
    return [rf"^model\.layers\.0\.(self_attn|mlp)\.{p}\." for p in projs]


FULL_SUBSETS = {"R1": ["k_proj"], "R2": ["k_proj", "v_proj"],
                "R3": ["k_proj", "v_proj", "q_proj"], "R4": ["k_proj", "v_proj", "gate_proj"]}


def phase_subset(runner: Runner, inputs: dict) -> None:
    adapters, base = inputs["adapters_8b_2L"], inputs["base_8b_2L"]
    work = runner.work
    for space in ("knots", "core"):
        for layers in (1, 2):
            key = f"{space}_tsv_full_L{layers}"
            out = work / key
            spec = write_spec(work / "specs" / f"{key}.yaml", merge_spec(
                key, "tsv", base, adapters, out, space=space, fmt="full",
                include=_layer_include(layers)))
            runner.run(key, f"ours tsv, {space}, full out, layer{'s 0-1' if layers == 2 else ' 0'}",
                       cli_command(spec), [*adapters, base], out, rounds=1,
                       extra={"include": _layer_include(layers)})
            shutil.rmtree(out, ignore_errors=True)
    for tag in ("R3", "R4"):
        key = f"core_tsv_full_{tag}"
        out = work / key
        include = _module_include(FULL_SUBSETS[tag])
        spec = write_spec(work / "specs" / f"{key}.yaml", merge_spec(
            key, "tsv", base, adapters, out, space="core", fmt="full", include=include))
        runner.run(key, f"ours tsv, core, full out, layer 0 {'+'.join(FULL_SUBSETS[tag])}",
                   cli_command(spec), [*adapters, base], out, rounds=1,
                   extra={"include": include})
        shutil.rmtree(out, ignore_errors=True)


def phase_full(runner: Runner, inputs: dict, subsets: list[str]) -> None:
    adapters, base = inputs["adapters_8b_2L"], inputs["base_8b_2L"]
    work = runner.work
    for tag in subsets:
        key = f"full_tsv_full_{tag}"
        out = work / key
        include = _module_include(FULL_SUBSETS[tag])
        spec = write_spec(work / "specs" / f"{key}.yaml", merge_spec(
            key, "tsv", base, adapters, out, space="full", fmt="full", include=include))
        runner.run(key, f"ours tsv, full space, full out, layer 0 "
                        f"{'+'.join(FULL_SUBSETS[tag])}",
                   cli_command(spec), [*adapters, base], out, rounds=1,
                   extra={"include": include})
        shutil.rmtree(out, ignore_errors=True)


def phase_peft(runner: Runner, inputs: dict, full_matrices: bool) -> None:
    adapters, base = inputs["adapters_1b"], inputs["base_1b"]
    work = runner.work / "peft"
    work.mkdir(parents=True, exist_ok=True)
    r16 = {"target_rank": RANK}
    ties = {"density": TIES_DENSITY, "alpha": 1.0}
    job = {
        "adapters": [str(a) for a in adapters], "base": str(base), "work": str(work),
        "result": str(work / "result.json"), "svd_full_matrices": full_matrices,
        "ours": [
            ["ta_core", "task_arithmetic", {"alpha": 1.0}, "core", "lora"],
            ["ta_core_r16", "task_arithmetic", {"alpha": 1.0, **r16}, "core", "lora"],
            ["tsv_core", "tsv", {"alpha": 1.0}, "core", "lora"],
            ["tsv_core_r16", "tsv", {"alpha": 1.0, **r16}, "core", "lora"],
            ["ties_core", "ties", ties, "core", "lora"],
            ["ties_core_r16", "ties", {**ties, **r16}, "core", "lora"],
            ["ties_full", "ties", ties, "full", "full"],
        ],
    }
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n")
    (work / "result.json").unlink(missing_ok=True)
    tag = "fm" if full_matrices else "thin"
    entry = runner.run(f"peft_{tag}", f"PEFT add_weighted_adapter + ours (Llama-3.2-1B, "
                                      f"{inputs['layers_1b']} layers)",
                       [sys.executable, str(Path(__file__).resolve()), "_peft", str(job_path)],
                       [*adapters, base], None, rounds=1)
    result_path = work / "result.json"
    if result_path.is_file():
        entry["result"] = json.loads(result_path.read_text())
        runner.runs[f"peft_{tag}"] = entry
        runner.store.write_text(json.dumps(runner.runs, indent=2) + "\n")
    for p in work.glob("ours-*"):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- report

def _best(runs: dict, prefix: str) -> dict | None:
    """The best-wall entry among the rounds `prefix.r0`, `prefix.r1`, …, or `prefix` itself."""
    found = [v for k, v in runs.items() if (k == prefix or k.startswith(prefix + ".r"))
             and v.get("ok")]
    if not found:
        return None
    best = dict(min(found, key=lambda v: v["wall_s"]))
    best["peak_rss_bytes"] = max(v["peak_rss_bytes"] for v in found)
    best["rounds_wall_s"] = [w for v in found for w in v["rounds_wall_s"]]
    best["rounds_other_cpu_cores"] = [c for v in found for c in v["rounds_other_cpu_cores"]]
    return best


def analyse(runs: dict, inputs: dict) -> dict:
    layers = inputs["layout_8b"].layers
    a: dict = {}
    floor = _best(runs, "floor")
    for key in ("core_tsv_lora", "core_ta_lora"):
        best = _best(runs, key)
        if best is None:
            continue
        row = {"wall_s": best["wall_s"], "peak_rss_bytes": best["peak_rss_bytes"],
               "per_layer_s": best["wall_s"] / layers,
               "rss_goal_met": best["peak_rss_bytes"] < RSS_GOAL}
        io = best.get("io") or {}
        if io:
            read = io.get("rchar", 0)
            adapters = adapter_bytes(inputs["adapters_8b"])
            row["bytes_read_after_imports"] = read
            row["adapter_bytes"] = adapters
            row["bytes_read_beyond_adapters"] = read - adapters
        if floor:
            row["over_floor"] = best["wall_s"] / floor["wall_s"]
            row["floor_goal_met"] = row["over_floor"] <= FLOOR_GOAL
        a[key] = row
    if floor:
        a["floor"] = {"wall_s": floor["wall_s"], "peak_rss_bytes": floor["peak_rss_bytes"],
                      "io": floor.get("io")}

    def extrapolate(space: str) -> dict | None:
        t1 = runs.get(f"{space}_tsv_full_L1")
        t2 = runs.get(f"{space}_tsv_full_L2")
        if not (t1 and t2 and t1["ok"] and t2["ok"]):
            return None
        per_layer = t2["wall_s"] - t1["wall_s"]
        return {"formula": f"t32 = t2 + {layers - 2}*(t2 - t1)", "t1_s": t1["wall_s"],
                "t2_s": t2["wall_s"], "per_layer_s": per_layer,
                "t32_s": t2["wall_s"] + (layers - 2) * per_layer,
                "peak_rss_bytes": max(t1["peak_rss_bytes"], t2["peak_rss_bytes"])}

    for space in ("knots", "core"):
        est = extrapolate(space)
        if est:
            a[f"{space}_full_out_extrapolated"] = est
    full = {tag: runs.get(f"full_tsv_full_{tag}") for tag in FULL_SUBSETS}
    if all(v and v["ok"] for v in full.values()):
        r1, r2, r3, r4 = (full[t]["wall_s"] for t in ("R1", "R2", "R3", "R4"))  # type: ignore
        dk, dq, dgate = r2 - r1, r3 - r2, r4 - r2
        t0 = r1 - dk
        per_layer = 2 * dq + 2 * dk + 3 * dgate
        a["full_extrapolated"] = {
            "formula": "dk = R2-R1, dq = R3-R2, dgate = R4-R2, t0 = R1-dk; "
                       f"layer = 2dq + 2dk + 3dgate; t32 = t0 + {layers}*layer",
            "R_s": {"R1": r1, "R2": r2, "R3": r3, "R4": r4},
            "module_s": {"k_proj (1024x4096)": dk, "q_proj (4096x4096)": dq,
                         "gate_proj (14336x4096)": dgate},
            "t0_s": t0, "per_layer_s": per_layer, "t32_s": t0 + layers * per_layer,
            "peak_rss_bytes": max(v["peak_rss_bytes"] for v in full.values()),  # type: ignore
            "q_proj_vs_reference_5.5min": dq / REFERENCE_FULL_TSV_4096_S,
        }
        fx = a["full_extrapolated"]
        if "core_tsv_lora" in a:
            fx["speedup_core_lora_vs_full"] = fx["t32_s"] / a["core_tsv_lora"]["wall_s"]
            a["core_tsv_lora"]["speedup_vs_full"] = fx["speedup_core_lora_vs_full"]
            a["core_tsv_lora"]["speedup_goal_met"] = \
                fx["speedup_core_lora_vs_full"] >= SPEEDUP_GOAL
        core_full = a.get("core_full_out_extrapolated")
        if core_full:
            fx["speedup_core_full_out_vs_full"] = fx["t32_s"] / core_full["t32_s"]
        for tag in ("R3", "R4"):
            c = runs.get(f"core_tsv_full_{tag}")
            if c and c["ok"]:
                fx[f"speedup_core_vs_full_same_modules_{tag}"] = full[tag]["wall_s"] / c["wall_s"]  # type: ignore
        knots = a.get("knots_full_out_extrapolated")
        if knots:
            fx["speedup_knots_vs_full"] = fx["t32_s"] / knots["t32_s"]
    for key in ("peft_thin", "peft_fm"):
        entry = runs.get(key)
        if not entry or "result" not in entry:
            continue
        t = entry["result"]["timings_s"]
        a[key] = {
            "svd_full_matrices": entry["result"]["settings"]["svd_full_matrices"],
            "timings_s": t,
            "ratio_peft_svd_over_ours_ta_core_r16": t["peft_svd"] / t["ours_ta_core_r16"],
            "ratio_peft_svd_over_ours_ta_core": t["peft_svd"] / t["ours_ta_core"],
            "ratio_peft_svd_over_ours_tsv_core": t["peft_svd"] / t["ours_tsv_core"],
            "ratio_peft_ties_svd_over_ours_ties_core_r16":
                t["peft_ties_svd"] / t["ours_ties_core_r16"],
            "ratio_peft_ties_svd_over_ours_ties_full": t["peft_ties_svd"] / t["ours_ties_full"],
            "agreement": entry["result"]["agreement"]["summary"],
            "agreement_definition": entry["result"]["agreement"]["definition"],
            "modules": entry["result"]["agreement"]["modules"],
            "child_wall_s": entry["wall_s"], "child_peak_rss_bytes": entry["peak_rss_bytes"],
        }
    return a


def machine() -> dict:
    import torch

    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(next(x for x in f if x.startswith("MemTotal")).split()[1]) * 1024
    import peft
    import transformers

    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": mem,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "peft": peft.__version__,
            "merge_service_commit": code_version()}


def code_version() -> str:
    """The commit the library runs at, `+` when merge_service/ has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT,
                              check=False).stdout.strip()

    dirty = git("status", "--porcelain", "--", "merge_service")
    return git("rev-parse", "--short", "HEAD") + ("+" if dirty else "")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _t(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 600 else f"{s:.1f} s"


def markdown(result: dict) -> str:
    m, a, runs = result["machine"], result["analysis"], result["runs"]
    lines = [
        "# LoRA-native merging: Llama-3-8B-shaped adapters, CPU",
        "",
        f"Generated {result['generated_at']} by `bench/lora_bench.py`. Machine: {m['cpu']}, "
        f"{m['cpus']} cores (shared: see \"other load\"), {m['memory_bytes'] / 2**30:.0f} GiB "
        f"RAM, no GPU; torch {m['torch']} ({m['torch_threads']} threads), transformers "
        f"{m['transformers']}, peft {m['peft']}, merge-service {m['merge_service_commit']} "
        "(each run's own commit in the table: runs are kept until rerun). "
        f"Page cache: {result['cache']}.",
        "",
        f"Inputs: {TASKS} synthetic PEFT LoRA adapters, r = {RANK}, lora_alpha = 32, q,k,v,o,"
        "gate,up,down of all 32 layers of Llama-3-8B (41.9 M parameters each), float32 "
        f"({_gb(result['inputs']['adapter_bytes_8b'])} GB in all). Merges compute in float32. "
        "`lora` output float32 (rank 128 = Σr), `full` output bfloat16. Wall = spawn to exit "
        "of the merge process (interpreter start and imports included), best of the rounds; "
        "peak RSS = its `ru_maxrss` (highest round).",
        "",
        "| run | wall | CPU s | peak RSS GB | rounds (wall s) | other load (cores) | commit |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    order = ["core_tsv_lora", "core_ta_lora", "floor", "core_tsv_full_L1", "core_tsv_full_L2",
             "knots_tsv_full_L1", "knots_tsv_full_L2", "core_tsv_full_R3", "core_tsv_full_R4",
             *[f"full_tsv_full_{t}" for t in FULL_SUBSETS], "peft_thin", "peft_fm"]
    for key in order:
        e = _best(runs, key)
        if e is None:
            continue
        lines.append(f"| {e['label']} | {_t(e['wall_s'])} | {e['cpu_s']:.1f} "
                     f"| {_gb(e['peak_rss_bytes'])} "
                     f"| {', '.join(f'{w:.1f}' for w in e['rounds_wall_s'])} "
                     f"| {', '.join(f'{c:.2f}' for c in e['rounds_other_cpu_cores'])} "
                     f"| {e.get('commit', '?')} |")
    lines += ["", "## Goals", ""]
    for key, what in (("core_tsv_lora", "tsv"), ("core_ta_lora", "task_arithmetic")):
        r = a.get(key)
        if not r:
            continue
        parts = [f"- core `{what}` → lora, 32 layers: {_t(r['wall_s'])} "
                 f"({r['per_layer_s']:.2f} s per layer; reference: ~{REFERENCE_PER_LAYER_S:.0f} s "
                 f"per layer), peak RSS {_gb(r['peak_rss_bytes'])} GB "
                 f"({'<' if r['rss_goal_met'] else '>='} 4 GB: "
                 f"{'met' if r['rss_goal_met'] else 'NOT met'})"]
        if "over_floor" in r:
            parts.append(f"; {r['over_floor']:.2f}x the I/O floor (goal <= 3x: "
                         f"{'met' if r['floor_goal_met'] else 'NOT met'})")
        if "speedup_vs_full" in r:
            parts.append(f"; {r['speedup_vs_full']:.0f}x faster than full-space tsv "
                         f"(extrapolated; goal >= 100x: "
                         f"{'met' if r['speedup_goal_met'] else 'NOT met'})")
        lines.append("".join(parts) + ".")
        if "bytes_read_beyond_adapters" in r:
            lines.append(f"  Bytes read by the merge after its imports: "
                         f"{_gb(r['bytes_read_after_imports'])} GB, of which the adapters "
                         f"{_gb(r['adapter_bytes'])} GB; the rest "
                         f"({r['bytes_read_beyond_adapters'] / 1e6:.1f} MB: headers, spec, "
                         "lazy imports) shows that no base tensor (16 GB) is read.")
    fl = a.get("floor")
    if fl and fl.get("io"):
        io = fl["io"]
        lines.append(f"- I/O floor: {_t(fl['wall_s'])} in all (in the child: read "
                     f"{io['read_s']:.1f} s, concatenate {io['concat_s']:.1f} s, write "
                     f"{io['write_s']:.1f} s of {_gb(io['bytes_written'])} GB), peak RSS "
                     f"{_gb(fl['peak_rss_bytes'])} GB.")
    for space in ("core", "knots"):
        e = a.get(f"{space}_full_out_extrapolated")
        if e:
            lines.append(f"- {space} tsv → full (bf16), EXTRAPOLATED to 32 layers "
                         f"({e['formula']}): {_t(e['t32_s'])} ({e['per_layer_s']:.1f} s per "
                         f"layer), peak RSS {_gb(e['peak_rss_bytes'])} GB.")
    fx = a.get("full_extrapolated")
    if fx:
        ms = fx["module_s"]
        lines.append(
            f"- full-space tsv, EXTRAPOLATED ({fx['formula']}): per module "
            + ", ".join(f"{k} {_t(v)}" for k, v in ms.items())
            + f"; {_t(fx['per_layer_s'])} per layer, {fx['t32_s'] / 3600:.1f} h for 32 layers; "
            f"peak RSS {_gb(fx['peak_rss_bytes'])} GB. The 4096×4096 module takes "
            f"{fx['q_proj_vs_reference_5.5min']:.2f}x the published 5.5 min.")
        for k, label in (("speedup_core_lora_vs_full", "core → lora (measured) vs full"),
                         ("speedup_core_full_out_vs_full", "core → full vs full (both "
                                                          "extrapolated)"),
                         ("speedup_knots_vs_full", "knots → full vs full (both extrapolated)"),
                         ("speedup_core_vs_full_same_modules_R3",
                          "core vs full on layer 0 k,v,q (both measured)"),
                         ("speedup_core_vs_full_same_modules_R4",
                          "core vs full on layer 0 k,v,gate (both measured)")):
            if k in fx:
                lines.append(f"  - speedup {label}: {fx[k]:.0f}x")
    for key in ("peft_thin", "peft_fm"):
        p = a.get(key)
        if not p:
            continue
        t = p["timings_s"]
        lines += [
            "",
            f"## PEFT `add_weighted_adapter` vs ours, Llama-3.2-1B shapes "
            f"({result['inputs']['layers_1b']} layers, {p['modules']} modules, 8 adapters, "
            f"svd_full_matrices={p['svd_full_matrices']})",
            "",
            "One process: a random-init `LlamaForCausalLM` (Llama-3.2-1B config, float32), "
            "the 8 adapters loaded with PEFT; then ours through `run_merge` on the same adapter "
            "directories (reading them and writing the output included; PEFT's figure is the "
            "`add_weighted_adapter` call alone, adapters already in memory).",
            "",
            "| operation | seconds |", "| --- | ---: |",
        ]
        for name, value in t.items():
            lines.append(f"| {name} | {value:.2f} |")
        lines += [
            "",
            f"- PEFT svd / ours task_arithmetic core (target_rank 16, the same result): "
            f"{p['ratio_peft_svd_over_ours_ta_core_r16']:.1f}x; / ours TA core rank 128 "
            f"(exact): {p['ratio_peft_svd_over_ours_ta_core']:.1f}x; / ours tsv core: "
            f"{p['ratio_peft_svd_over_ours_tsv_core']:.1f}x",
            f"- PEFT ties_svd / ours ties core (target_rank 16): "
            f"{p['ratio_peft_ties_svd_over_ours_ties_core_r16']:.1f}x; / ours ties full space "
            f"(the same TIES, no truncation): "
            f"{p['ratio_peft_ties_svd_over_ours_ties_full']:.1f}x",
            "",
            f"Agreement ({p['agreement_definition']}):",
            "",
            "| comparison | max | median | min |", "| --- | ---: | ---: | ---: |",
        ]
        for name, s in p["agreement"].items():
            lines.append(f"| {name} | {s['max']:.3g} | {s['median']:.3g} | {s['min']:.3g} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_cli":
        return child_cli(argv[1], argv[3:])
    if argv and argv[0] == "_floor":
        return child_floor(argv[1], argv[2], argv[3:])
    if argv and argv[0] == "_peft":
        return child_peft(argv[1])

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "out" / "lora")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--phases", default="core,subset,peft,full")
    parser.add_argument("--full-subsets", default="R1,R2,R3,R4")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the core phase")
    parser.add_argument("--cache", choices=["cold", "warm", "auto"], default="auto")
    parser.add_argument("--peft-layers", type=int, default=4)
    parser.add_argument("--peft-full-matrices", action="store_true",
                        help="PEFT's default svd_full_matrices=True (slower; same result)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (dry run)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)

    from make_lora_adapters import make_all

    out = args.out.resolve()
    print(f"inputs under {out} ...", flush=True)
    inputs = make_all(out, TASKS, 0, args.peft_layers, args.tiny)
    runner = Runner(out, args.cache, args.repeat)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.report_only:
        for phase in phases:
            if phase == "core":
                phase_core(runner, inputs)
            elif phase == "subset":
                phase_subset(runner, inputs)
            elif phase == "full":
                phase_full(runner, inputs, args.full_subsets.split(","))
            elif phase == "peft":
                phase_peft(runner, inputs, args.peft_full_matrices)
            else:
                parser.error(f"unknown phase {phase!r}")

    result = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "cache": "cold (page cache dropped before every run)" if runner.cache == "cold" else
                 "warm (every input read once before every run)",
        "inputs": {
            "tiny": args.tiny, "tasks": TASKS, "rank": RANK, "lora_alpha": 32,
            "adapter_dtype": "float32", "adapter_bytes_8b": adapter_bytes(inputs["adapters_8b"]),
            "layout_8b": asdict(inputs["layout_8b"]), "layout_1b": asdict(inputs["layout_1b"]),
            "layers_1b": inputs["layers_1b"],
            "base_8b": "sparse Llama-3-8B checkpoint (headers only, data holes)",
            "base_8b_2L": "random bf16 adapted Linear weights of layers 0-1",
            "base_1b": "sparse zero float32 adapted Linear weights of the PEFT layers",
        },
        "goals": {"rss_bytes": RSS_GOAL, "over_floor": FLOOR_GOAL, "speedup": SPEEDUP_GOAL,
                  "reference_per_layer_s": REFERENCE_PER_LAYER_S,
                  "reference_full_tsv_4096_s": REFERENCE_FULL_TSV_4096_S},
        "analysis": analyse(runner.runs, inputs),
        "runs": runner.runs,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "lora_bench.json").write_text(json.dumps(result, indent=2, default=str)
                                                  + "\n")
    table = markdown(result)
    (args.results / "lora_bench.md").write_text(table)
    print()
    print(table)
    return 0 if all(v.get("ok") for v in runner.runs.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
