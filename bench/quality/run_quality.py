"""Quality table: every merge method and LoRA space on the example task adapters (issue 3.7).

All committed example adapters (examples/tasks/<task>/adapter, r and head per task) are merged
together by `merge_service.engine.run_merge` (one spec per merge; no method is re-implemented
here), and the merged encoder is scored with each task's own head (examples/tasks/evaluate.py).

Rows:
- references: the base with each task's head (the head trained with the adapter, on the frozen
  base), the frozen-encoder probe of `metrics.json` (recorded on the whole test split), and each
  individual adapter with its head;
- every method in every space it allows (METHODS.md section 10), with the METHODS.md defaults,
  and, for methods with `alpha`, `alpha` chosen from a small grid on the validation split (mean
  validation accuracy over the tasks; the test split is never used to choose);
- `tsv_compress` and `rmm` (reversible): each task reverted with `merge_service.revert.revert`
  and scored on its own task ("recovered" accuracy); the model `rmm` serves is scored as a merge;
- `adarank` with the tasks' calibration sets.

Normalized accuracy = merged accuracy / the individual adapter's accuracy on the same examples.

    .venv/bin/python bench/quality/run_quality.py            # everything; resumes from the cache
    .venv/bin/python bench/quality/run_quality.py --report   # rebuild quality.md/.json/.png

Evaluations are cached in `--work/cache.json` keyed by the configuration and the adapters'
content hash, so an interrupted run resumes and a changed adapter is re-evaluated. Seeded:
`options.seed` of every spec, the example subsets and adarank's batches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from transformers.utils import logging as hf_logging  # noqa: E402

from examples.tasks.evaluate import (  # noqa: E402
    TASK_NAMES,
    Task,
    base_model_path,
    embed,
    load_base,
    load_head,
    load_task,
)
from merge_service.engine import run_merge  # noqa: E402
from merge_service.methods import available  # noqa: E402
from merge_service.revert import revert  # noqa: E402
from merge_service.spec import spec_from_dict  # noqa: E402

HERE = Path(__file__).resolve().parent
SPACES = ("full", "core", "knots")


def settings(method: str) -> tuple[tuple[str, ...], float | None]:
    """The spaces a method runs in on LoRA inputs and its default `alpha` (None: it has none),
    as the library declares them (`MergeMethod.spaces`, its `Params`)."""
    cls = available()[method]
    alpha = cls.Params.model_fields.get("alpha")
    return (tuple(s for s in SPACES if s in cls.spaces),
            None if alpha is None else float(alpha.default))


# method -> (spaces, default alpha)
METHODS = {m: settings(m) for m in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv",
                                    "iso_c", "iso_cts", "cart", "drm", "average")}
# reverted task by task; rmm's served model is also scored as a merge
REVERSIBLE = {m: settings(m)[0] for m in ("tsv_compress", "rmm")}
RMM_DEFAULT_ALPHA = settings("rmm")[1]
SAME_WEIGHTS_ATOL = 1e-6  # a space whose merged weights equal full space's to this is not re-run


# ---------------------------------------------------------------------------------------------
# tasks, subsets, evaluation


def committed_tasks() -> list[str]:
    """Tasks whose adapter, head and metrics are committed (git), in TASK_NAMES order."""
    listed = subprocess.run(["git", "ls-files", "examples/tasks"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    have = set(listed)
    return [t for t in TASK_NAMES
            if {f"examples/tasks/{t}/adapter/adapter_model.safetensors",
                f"examples/tasks/{t}/adapter/adapter_config.json",
                f"examples/tasks/{t}/head.safetensors",
                f"examples/tasks/{t}/metrics.json"} <= have]


def subset(task: Task, split: str, per_task: int, seed: int) -> list[int]:
    """Indices of a seeded, label-balanced subset of a split (all of it when per_task <= 0)."""
    examples = task.split(split)
    if per_task <= 0 or per_task >= len(examples):
        return list(range(len(examples)))
    by_label: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    rng = random.Random(f"{seed}/{task.name}/{split}")
    for indices in by_label.values():
        rng.shuffle(indices)
    take, picked = per_task // len(by_label), []
    for indices in by_label.values():
        picked += indices[:take]
    return sorted(picked)


@dataclass
class Evaluator:
    tasks: list[Task]
    subsets: dict[tuple[str, str], list[int]]  # (task, split) -> indices
    heads: dict[str, torch.nn.Linear]

    def accuracy(self, encoder: torch.nn.Module, tasks: Iterable[str], split: str
                 ) -> dict[str, float]:
        out = {}
        for task in self.tasks:
            if task.name not in tasks:
                continue
            examples = [task.split(split)[i] for i in self.subsets[task.name, split]]
            features = embed(encoder, [e.text for e in examples])
            predicted = self.heads[task.name](features).argmax(-1)
            labels = torch.tensor([e.label for e in examples])
            out[task.name] = float((predicted == labels).double().mean())
        return out

    def sizes(self) -> dict[str, dict[str, int]]:
        return {t.name: {s: len(self.subsets[t.name, s]) for s in ("validation", "test")}
                for t in self.tasks}


def load_encoder(directory: Path) -> torch.nn.Module:
    """A merged model directory: a full model, or a PEFT adapter (rmm's served model in core)."""
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(), directory).eval().merge_and_unload()
    from transformers import AutoModel

    return AutoModel.from_pretrained(directory).eval()


def max_weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa
               if sa[k].is_floating_point())


# ---------------------------------------------------------------------------------------------
# merges through the library


def spec_for(tasks: list[Task], method: str, params: dict[str, Any], space: str,
             destination: Path, fmt: str = "full", seed: int = 0,
             calibration: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": f"quality {method} {space}",
        "base": str(base_model_path()),
        "models": [{"source": str(t.adapter_dir), "name": t.name} for t in tasks],
        "method": {"name": method, "params": params},
        "space": space,
        "output": {"destination": str(destination), "format": fmt},
        "options": {"device": "cpu", "seed": seed},
    }
    if calibration:
        spec["calibration"] = {t.name: {"path": str(t.calibration_path)} for t in tasks}
    return spec


def merge(spec: dict[str, Any]) -> tuple[Path, float, dict[str, Any]]:
    destination = Path(spec["output"]["destination"])
    if destination.exists():
        shutil.rmtree(destination)
    started = time.perf_counter()
    result = run_merge(spec_from_dict(spec))
    return destination, time.perf_counter() - started, result.report


class Cache:
    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.entries: dict[str, Any] = data.get(fingerprint, {})
        self.all = data

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value
        self.all[self.fingerprint] = self.entries
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.all, indent=1))
        tmp.replace(self.path)


def fingerprint(tasks: list[Task], args: argparse.Namespace) -> str:
    digest = hashlib.sha256()
    for task in tasks:
        for path in (task.adapter_dir / "adapter_model.safetensors",
                     task.adapter_dir / "adapter_config.json", task.head_path):
            digest.update(path.read_bytes())
    digest.update(json.dumps([args.val_per_task, args.test_per_task, args.seed]).encode())
    return digest.hexdigest()[:16]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Runner:
    def __init__(self, args: argparse.Namespace, tasks: list[Task], evaluator: Evaluator,
                 cache: Cache) -> None:
        self.args, self.tasks, self.ev, self.cache = args, tasks, evaluator, cache
        self.names = [t.name for t in tasks]
        self.work = Path(args.work)

    # one merge, scored on the given splits (cached)
    def scored_merge(self, key: str, spec: dict[str, Any], splits: Sequence[str],
                     same_as: tuple[str, Path] | None = None) -> dict[str, Any]:
        entry = self.cache.get(key) or {}
        missing = [s for s in splits if s not in entry.get("accuracy", {})]
        if not missing:
            return entry
        directory = Path(spec["output"]["destination"])
        if not (directory / "merge_report.json").is_file() or "wall_s" not in entry:
            directory, wall, report = merge(spec)
            entry.update(wall_s=round(wall, 3),
                         merge_timings_s=report.get("timings_s", {}),
                         space=report.get("space"))
            log(f"merged {key} in {wall:.1f} s")
        encoder = load_encoder(directory)
        if same_as is not None and "max_abs_weight_difference_to_full" not in entry \
                and (same_as[1] / "merge_report.json").is_file():
            other_key, other_dir = same_as
            diff = max_weight_difference(encoder, load_encoder(other_dir))
            entry["max_abs_weight_difference_to_full"] = diff
            if diff <= SAME_WEIGHTS_ATOL:
                entry["same_as"] = other_key
        accuracy = entry.setdefault("accuracy", {})
        for split in missing:
            if "same_as" in entry and split in (self.cache.get(entry["same_as"]) or {}).get(
                    "accuracy", {}):
                accuracy[split] = self.cache.get(entry["same_as"])["accuracy"][split]
                continue
            started = time.perf_counter()
            accuracy[split] = self.ev.accuracy(encoder, self.names, split)
            entry.setdefault("eval_s", {})[split] = round(time.perf_counter() - started, 2)
            log(f"  {key} {split}: mean {mean(accuracy[split].values()):.4f}")
        self.cache.put(key, entry)
        return entry

    def references(self) -> None:
        if self.cache.get("reference/base") is None:
            base = load_base()
            self.cache.put("reference/base", {"accuracy": {
                s: self.ev.accuracy(base, self.names, s) for s in ("validation", "test")}})
        for task in self.tasks:
            key = f"reference/adapter/{task.name}"
            if self.cache.get(key) is None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(load_base(), task.adapter_dir).eval()
                model = model.merge_and_unload()
                self.cache.put(key, {"accuracy": {
                    s: self.ev.accuracy(model, [task.name], s)
                    for s in ("validation", "test")}})
        log("references done")

    def method_grid(self, method: str) -> None:
        spaces, default = METHODS[method]
        alphas = [None] if default is None else sorted(set(self.args.alphas) | {default})
        dirs: dict[tuple[str, float | None], Path] = {}
        for alpha in alphas:
            for space in spaces:
                params = {} if alpha is None else {"alpha": alpha}
                key = f"{method}/{space}/alpha={alpha}"
                dest = self.work / "merges" / f"{method}-{space}-{alpha}"
                same = (f"{method}/full/alpha={alpha}", dirs[("full", alpha)]) \
                    if space != "full" else None
                splits = ("validation", "test") if alpha == default else ("validation",)
                self.scored_merge(key, spec_for(self.tasks, method, params, space, dest,
                                                seed=self.args.seed), splits, same)
                dirs[(space, alpha)] = dest
        for space in spaces:  # the tuned alpha's test accuracy
            if default is None:
                continue
            best = choose_alpha({a: self.cache.get(f"{method}/{space}/alpha={a}")
                                 for a in alphas}, default)
            key = f"{method}/{space}/alpha={best}"
            dest = dirs[(space, best)]
            same = (f"{method}/full/alpha={best}", dirs[("full", best)]) \
                if space != "full" else None
            self.scored_merge(key, spec_for(self.tasks, method, {"alpha": best}, space, dest,
                                            seed=self.args.seed), ("validation", "test"), same)
        for dest in dirs.values():
            shutil.rmtree(dest, ignore_errors=True)

    def reversible(self, method: str) -> None:
        for space in REVERSIBLE[method]:
            key = f"{method}/{space}/recovered"
            entry = self.cache.get(key) or {}
            dest = self.work / "merges" / f"{method}-{space}-artifact"
            if not entry.get("recovered"):
                fmt = "compressed" if method == "tsv_compress" else "reversible"
                _, wall, report = merge(spec_for(self.tasks, method, {}, space, dest, fmt,
                                                 seed=self.args.seed))
                log(f"merged {key} in {wall:.1f} s")
                entry = {"wall_s": round(wall, 3), "merge_timings_s": report.get("timings_s"),
                         "output": report.get("output"), "recovered": {},
                         "recovery_error": report.get("recovery_error")
                         or report.get("relative_recovery_error")}
                for task in self.tasks:
                    out = self.work / "merges" / f"{method}-{space}-revert-{task.name}"
                    if out.exists():
                        shutil.rmtree(out)
                    started = time.perf_counter()
                    revert(dest, task.name, out)
                    revert_s = time.perf_counter() - started
                    model = load_encoder(out)
                    entry["recovered"][task.name] = {
                        "revert_s": round(revert_s, 3),
                        **{s: self.ev.accuracy(model, [task.name], s)[task.name]
                           for s in ("validation", "test")}}
                    shutil.rmtree(out)
                    log(f"  {key} {task.name}: {entry['recovered'][task.name]}")
                entry["report"] = {k: v for k, v in report.items()
                                   if k not in {"tensors", "copied_tensors"}}
                self.cache.put(key, entry)
            if method == "rmm":  # the served model θ0 + alpha·μ, scored as a merge
                alphas = sorted(set(self.args.alphas) | {RMM_DEFAULT_ALPHA})
                served: dict[float, Path] = {}
                for alpha in alphas:
                    skey = f"rmm/{space}/alpha={alpha}"
                    sdest = self.work / "merges" / f"rmm-{space}-{alpha}"
                    splits = ("validation", "test") if alpha == RMM_DEFAULT_ALPHA \
                        else ("validation",)
                    self.scored_merge(skey, spec_for(self.tasks, "rmm", {"alpha": alpha}, space,
                                                     sdest, "reversible", seed=self.args.seed),
                                      splits)
                    served[alpha] = sdest
                best = choose_alpha({a: self.cache.get(f"rmm/{space}/alpha={a}")
                                     for a in alphas}, RMM_DEFAULT_ALPHA)
                self.scored_merge(f"rmm/{space}/alpha={best}",
                                  spec_for(self.tasks, "rmm", {"alpha": best}, space,
                                           served[best], "reversible", seed=self.args.seed),
                                  ("validation", "test"))
                for sdest in served.values():
                    shutil.rmtree(sdest, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)

    def adarank(self) -> None:
        key = f"adarank/full/steps={self.args.adarank_steps}"
        dest = self.work / "merges" / "adarank"
        spec = spec_for(self.tasks, "adarank", {"steps": self.args.adarank_steps}, "full", dest,
                        seed=self.args.seed, calibration=True)
        entry = self.scored_merge(key, spec, ("validation", "test"))
        if "adarank" not in entry and (dest / "merge_report.json").is_file():
            report = json.loads((dest / "merge_report.json").read_text())["adarank"]
            entry["adarank"] = {k: report.get(k) for k in
                                ("timings_s", "loss_curve", "calibration_entropy", "lambda",
                                 "kept_rank") if k in report}
            self.cache.put(key, entry)
        shutil.rmtree(dest, ignore_errors=True)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def choose_alpha(entries: dict[float, Any], default: float) -> float:
    """The alpha of the best mean validation accuracy; ties go to the default, then the
    smaller alpha."""
    scored = [(mean(e["accuracy"]["validation"].values()), a == default, -a)
              for a, e in entries.items() if e and "validation" in e.get("accuracy", {})]
    return -max(scored)[2]


# ---------------------------------------------------------------------------------------------
# the report


def build_results(args: argparse.Namespace, tasks: list[Task], cache: Cache,
                  evaluator: Evaluator) -> dict[str, Any]:
    names = [t.name for t in tasks]
    individual = {s: {n: cache.get(f"reference/adapter/{n}")["accuracy"][s][n] for n in names}
                  for s in ("validation", "test")}

    def row(accuracy: dict[str, float]) -> dict[str, Any]:
        normalized = {n: accuracy[n] / individual["test"][n] for n in names}
        return {"accuracy": accuracy, "mean_accuracy": mean(accuracy.values()),
                "normalized": normalized, "mean_normalized": mean(normalized.values())}

    rows: list[dict[str, Any]] = []
    base = cache.get("reference/base")["accuracy"]
    rows.append({"kind": "reference", "method": "base + task head", "space": "-",
                 **row(base["test"]), "validation_mean": mean(base["validation"].values())})
    probe = {t.name: t.metrics()["base_head"]["test"] for t in tasks}
    rows.append({"kind": "reference", "method": "frozen probe (metrics.json, whole test split)",
                 "space": "-", **row(probe)})
    rows.append({"kind": "reference", "method": "individual adapters", "space": "-",
                 **row(individual["test"])})

    merges = [*METHODS, "rmm"]
    for method in merges:
        spaces, default = METHODS.get(method, (REVERSIBLE.get(method, ()), RMM_DEFAULT_ALPHA))
        for space in spaces:
            grid = {float(k.rsplit("=", 1)[1]) if default is not None else None: v
                    for k, v in cache.entries.items()
                    if k.startswith(f"{method}/{space}/alpha=")}
            if not grid:
                continue
            entry = grid[default]
            result: dict[str, Any] = {"kind": "merge", "method": method, "space": space,
                                      "default_alpha": default,
                                      "default": {**row(entry["accuracy"]["test"]),
                                                  "wall_s": entry["wall_s"]}}
            if default is not None:
                best = choose_alpha(grid, default)
                chosen = grid[best]
                result["tuned_alpha"] = best
                result["tuned"] = {**row(chosen["accuracy"]["test"]), "wall_s": chosen["wall_s"]}
                result["alpha_grid"] = {
                    str(a): {"validation_mean": mean(e["accuracy"]["validation"].values()),
                             "wall_s": e["wall_s"],
                             **({"same_weights_as": e["same_as"]} if "same_as" in e else {}),
                             **({"max_abs_weight_difference_to_full":
                                 e["max_abs_weight_difference_to_full"]}
                                if "max_abs_weight_difference_to_full" in e else {})}
                    for a, e in sorted(grid.items())}
            if method == "rmm":
                result["method"] = "rmm (served θ0 + alpha·μ)"
            rows.append(result)
    ada = next((v | {"key": k} for k, v in cache.entries.items() if k.startswith("adarank/")),
               None)
    if ada is not None:
        rows.append({"kind": "merge", "method": "adarank", "space": "full",
                     "steps": int(ada["key"].rsplit("=", 1)[1]),
                     "default": {**row(ada["accuracy"]["test"]), "wall_s": ada["wall_s"]},
                     "adarank": ada.get("adarank")})
    recovered = []
    for method, spaces in REVERSIBLE.items():
        for space in spaces:
            entry = cache.get(f"{method}/{space}/recovered")
            if entry is None:
                continue
            accuracy = {n: entry["recovered"][n]["test"] for n in names}
            recovered.append({"method": method, "space": space, **row(accuracy),
                              "wall_s": entry["wall_s"],
                              "revert_s": {n: entry["recovered"][n]["revert_s"] for n in names},
                              "output": entry.get("output"),
                              "report": entry.get("report")})
    return {
        "tasks": names,
        "sizes": evaluator.sizes(),
        "alphas": args.alphas,
        "seed": args.seed,
        "adarank_steps": args.adarank_steps,
        "individual": individual,
        "rows": rows,
        "recovered": recovered,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "git": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    names = results["tasks"]
    short = {n: n.replace("wordnet_", "wn_").replace("fortune_", "fort_") for n in names}
    lines = [
        "# Merge quality on the example task adapters",
        "",
        "Generated by `bench/quality/run_quality.py` (do not edit by hand). "
        f"{len(names)} LoRA adapters of all-MiniLM-L6-v2 merged together, each merged encoder "
        "scored with every task's own head. Test accuracy, %; `norm` = merged / individual "
        "adapter accuracy on the same examples, averaged over tasks. Examples per task "
        "(validation / test): " + ", ".join(
            f"{n} {results['sizes'][n]['validation']}/{results['sizes'][n]['test']}"
            for n in names) + ".",
        "",
        "Default = METHODS.md defaults. Tuned = `alpha` chosen from "
        f"{{{', '.join(f'{a:g}' for a in results['alphas'])}}} (plus the default) by mean "
        "validation accuracy; the test split is never used to choose.",
        "",
        "## Average over tasks",
        "",
        "| method | space | default acc | default norm | tuned α | tuned acc | tuned norm "
        "| merge wall s (default) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        if r["kind"] == "reference":
            lines.append(f"| {r['method']} | - | {pct(r['mean_accuracy'])} | "
                         f"{pct(r['mean_normalized'])} | | | | |")
            continue
        d, t = r["default"], r.get("tuned")
        name = r["method"] + (f" ({r['steps']} steps)" if "steps" in r else "")
        da = f" (α={r['default_alpha']:g})" if r.get("default_alpha") is not None else ""
        lines.append(
            f"| {name}{da} | {r['space']} | {pct(d['mean_accuracy'])} | "
            f"{pct(d['mean_normalized'])} | "
            + (f"{r['tuned_alpha']:g} | {pct(t['mean_accuracy'])} | {pct(t['mean_normalized'])}"
               if t else "| | ") + f" | {d['wall_s']:.1f} |")
    lines += ["", "## Recovered tasks (revert each task from the artifact, scored on its own "
              "task)", "",
              "| method | space | " + " | ".join(short[n] for n in names)
              + " | mean acc | mean norm | size ratio |",
              "| --- | --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: |"]
    for r in results["recovered"]:
        ratio = (r.get("output") or {}).get("size_ratio")
        lines.append(f"| {r['method']} | {r['space']} | "
                     + " | ".join(pct(r["accuracy"][n]) for n in names)
                     + f" | {pct(r['mean_accuracy'])} | {pct(r['mean_normalized'])} | "
                     + (f"{ratio:.3f}" if ratio is not None else "-") + " |")
    for which in ("default", "tuned"):
        lines += ["", f"## Per task, {which} (test accuracy % / normalized %)", "",
                  "| method | space | " + " | ".join(short[n] for n in names) + " |",
                  "| --- | --- | " + " | ".join("---:" for _ in names) + " |"]
        for r in results["rows"]:
            cell = r if r["kind"] == "reference" else r.get(which)
            if cell is None:
                continue
            alpha = r.get("tuned_alpha") if which == "tuned" else r.get("default_alpha")
            label = r["method"] + (f" (α={alpha:g})" if alpha is not None else "")
            lines.append(f"| {label} | {r['space']} | " + " | ".join(
                f"{pct(cell['accuracy'][n])} / {pct(cell['normalized'][n])}" for n in names)
                + " |")
    lines += ["", "## Alpha grid (mean validation accuracy %)", "",
              "| method | space | " + " | ".join(f"{a:g}" for a in sorted(
                  set(results["alphas"]) | {0.3, 1.0, 2.0})) + " |",
              "| --- | --- |" + " ---: |" * len(set(results["alphas"]) | {0.3, 1.0, 2.0})]
    grid_alphas = sorted(set(results["alphas"]) | {0.3, 1.0, 2.0})
    for r in results["rows"]:
        if "alpha_grid" not in r:
            continue
        cells = []
        for a in grid_alphas:
            g = r["alpha_grid"].get(str(a))
            mark = "*" if a == r["tuned_alpha"] else ""
            cells.append(f"{pct(g['validation_mean'])}{mark}" if g else "")
        lines.append(f"| {r['method']} | {r['space']} | " + " | ".join(cells) + " |")
    lines += ["", "`*` = chosen. Spaces whose merged weights equal full space's to "
              f"{SAME_WEIGHTS_ATOL:g} (max abs) reuse its evaluation; quality.json records the "
              "difference per merge.", ""]
    path.write_text("\n".join(lines))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["kind"] == "merge"]
    colors = {"full": "#4c72b0", "core": "#dd8452", "knots": "#55a868"}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 6.5),
                                  gridspec_kw={"width_ratios": [4, 1.3]})
    width = 0.26
    for i, method in enumerate(methods):
        for j, space in enumerate(SPACES):
            r = next((x for x in rows if x["method"] == method and x["space"] == space), None)
            if r is None:
                continue
            x = i + (j - 1) * width
            tuned = r.get("tuned", r["default"])
            ax.bar(x, 100 * tuned["mean_normalized"], width * 0.95, color=colors[space],
                   label=f"{space} (tuned α)" if i == 0 or method == "average" else None)
            ax.plot([x - width * 0.45, x + width * 0.45],
                    [100 * r["default"]["mean_normalized"]] * 2, color="black", lw=1.6,
                    label="default params" if (i, j) == (0, 0) else None)
    refs = {r["method"]: r for r in results["rows"] if r["kind"] == "reference"}
    ax.axhline(100, color="grey", ls="--", lw=1)
    base = refs["base + task head"]["mean_normalized"] * 100
    ax.axhline(base, color="crimson", ls=":", lw=1.2, label="base + task head")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([m.replace(" (served θ0 + alpha·μ)", "\n(served)") for m in methods],
                       rotation=30, ha="right")
    ax.set_ylabel("normalized accuracy, mean over tasks (%)")
    low = min(base, *(100 * r["default"]["mean_normalized"] for r in rows)) - 5
    ax.set_ylim(max(0, low), 105)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="lower left", fontsize=8)
    ax.set_title(f"{len(results['tasks'])} MiniLM LoRA adapters merged: bars tuned α, "
                 "black line default")
    rec = results["recovered"]
    labels2 = [f"{r['method']}\n{r['space']}" for r in rec]
    ax2.bar(range(len(rec)), [100 * r["mean_normalized"] for r in rec], color="#8172b2")
    ax2.set_xticks(range(len(rec)))
    ax2.set_xticklabels(labels2, fontsize=8)
    ax2.axhline(100, color="grey", ls="--", lw=1)
    ax2.set_ylim(ax.get_ylim())
    ax2.set_title("recovered tasks (revert)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", help="default: every task with a committed "
                        "adapter, head and metrics.json")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 1.0, 1.5, 2.0],
                        help="alpha grid (the method's default is always added)")
    parser.add_argument("--val-per-task", type=int, default=0,
                        help="seeded label-balanced validation subset per task (0: all)")
    parser.add_argument("--test-per-task", type=int, default=0,
                        help="seeded label-balanced test subset per task (0: all)")
    parser.add_argument("--adarank-steps", type=int, default=500)
    parser.add_argument("--methods", nargs="*", help="subset of the methods (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "bench" / "out" / "quality"))
    parser.add_argument("--results", default=str(HERE))
    parser.add_argument("--report", action="store_true", help="only rebuild the report")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    names = args.tasks or committed_tasks()
    if len(names) < 2:
        parser.error(f"need at least 2 tasks with committed adapters, found {names}")
    tasks = [load_task(n) for n in names]
    subsets = {(t.name, s): subset(t, s, args.val_per_task if s == "validation"
                                   else args.test_per_task, args.seed)
               for t in tasks for s in ("validation", "test")}
    evaluator = Evaluator(tasks, subsets, {t.name: load_head(t) for t in tasks})
    work = Path(args.work)
    (work / "merges").mkdir(parents=True, exist_ok=True)
    cache = Cache(work / "cache.json", fingerprint(tasks, args))
    runner = Runner(args, tasks, evaluator, cache)
    log(f"tasks {names}; sizes {evaluator.sizes()}; cache {cache.fingerprint}")

    if not args.report:
        wanted = args.methods or [*METHODS, *REVERSIBLE, "adarank"]
        runner.references()
        for method in wanted:
            if method in METHODS:
                runner.method_grid(method)
            elif method in REVERSIBLE:
                runner.reversible(method)
            elif method == "adarank":
                runner.adarank()
            else:
                parser.error(f"unknown method {method}")

    results = build_results(args, tasks, cache, evaluator)
    results["cache"] = cache.fingerprint
    results["merges"] = {k: {kk: vv for kk, vv in v.items() if kk != "report"}
                         for k, v in cache.entries.items()}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    write_markdown(results, out / "quality.md")
    plot(results, out / "quality.png")
    log(f"wrote {out / 'quality.md'}, quality.json, quality.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
