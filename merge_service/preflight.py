"""Preflight: every check of DESIGN.md section 2 that can run before any heavy work.

Each check returns problems instead of raising, so that the user sees all of them at once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import torch

from merge_service.errors import Problem, capped
from merge_service.inputs import TaskInput
from merge_service.methods import MergeMethod, available
from merge_service.sinks.artifact import ARTIFACT_FORMATS
from merge_service.sinks.model_card import model_card_title
from merge_service.sources.checkpoint import Checkpoint, TensorInfo
from merge_service.sources.lora import LoraAdapter
from merge_service.sources.resolve import ResolvedSource, looks_local
from merge_service.spec import JobSpec


def resolve_device(requested: str) -> tuple[torch.device | None, list[Problem]]:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    try:
        device = torch.device(requested)
    except RuntimeError:  # an index beyond what torch can parse (the form is checked already)
        return None, [Problem(f"{requested} is not a device torch knows", field="options.device")]
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None, [Problem("CUDA was requested but is not available on this machine",
                                  field="options.device")]
        if device.index is not None and device.index >= torch.cuda.device_count():
            return None, [Problem(f"{requested} requested but only {torch.cuda.device_count()} "
                                  "CUDA devices are present", field="options.device")]
    return device, []


def effective_space(spec: JobSpec, is_lora: bool) -> str:
    if not is_lora:
        return "full"
    return "core" if spec.space == "auto" else spec.space


def input_kind_problems(inputs: list[TaskInput], spec: JobSpec) -> list[Problem]:
    kinds = {i.is_lora for i in inputs}
    if len(kinds) > 1:
        listing = ", ".join(f"{i.name} ({'LoRA adapter' if i.is_lora else 'full checkpoint'})"
                            for i in inputs)
        return [Problem(f"the task models must be all full checkpoints or all LoRA adapters, "
                        f"got {listing}", field="models")]
    is_lora = kinds == {True}
    if not is_lora and spec.space not in {"auto", "full"}:
        return [Problem(f"space {spec.space!r} applies to LoRA adapters only; the inputs are "
                        "full checkpoints (use auto or full)", field="space")]
    return []


def space_problems(spec: JobSpec, method: MergeMethod | None, space: str, is_lora: bool,
                   target_rank: object) -> list[Problem]:
    """The method runs in the space; `lora` output and `target_rank` come from `core` only."""
    problems = []
    if is_lora and method is not None and space not in method.spaces:
        problems.append(Problem(
            f"method {method.name} does not run in {space!r} space (it runs in: "
            f"{', '.join(sorted(method.spaces))})"
            + ("; auto means core for LoRA inputs" if spec.space == "auto" else ""),
            field="space"))
    if spec.output.format == "lora" and is_lora and space != "core":
        problems.append(Problem(f"format 'lora' is written from core space, not {space!r}",
                                field="space"))
    if target_rank is not None:
        if spec.output.format != "lora":
            problems.append(Problem("target_rank truncates the 'lora' output; the output "
                                    f"format is {spec.output.format!r}",
                                    field="method.params.target_rank", also=("output.format",)))
        else:
            problems += target_rank_problems(target_rank)
    return problems


def target_rank_problems(target_rank: object) -> list[Problem]:
    """`target_rank`, a parameter of the `lora` output (not of the method), is absent or a
    positive integer."""
    if target_rank is None or (isinstance(target_rank, int) and not isinstance(target_rank, bool)
                               and target_rank >= 1):
        return []
    return [Problem(f"target_rank must be a positive integer, got {target_rank!r}",
                    field="method.params.target_rank")]


def full_checkpoint_problems(base: Checkpoint, task: TaskInput) -> list[Problem]:
    """Same tensor names and shapes as the base; floating tensors where the base has them."""
    model = task.model
    assert isinstance(model, Checkpoint)
    problems = []
    for name, info in base.tensors.items():
        other = model.tensors.get(name)
        if other is None and not info.is_float:
            # integer buffers are copied from the base (METHODS.md section 0); transformers >= 5
            # does not save non-persistent ones such as BERT's `embeddings.position_ids`
            continue
        if other is None:
            problems.append(Problem("missing (present in the base)", model=task.name, tensor=name))
        elif other.shape != info.shape:
            problems.append(Problem(f"shape {list(other.shape)}, expected {list(info.shape)} "
                                    "as in the base", model=task.name, tensor=name))
        elif info.is_float and not other.is_float:
            problems.append(Problem(f"dtype {other.dtype}, expected a floating-point tensor",
                                    model=task.name, tensor=name))
    for name in sorted(model.tensors.keys() - base.tensors.keys()):
        if not model.tensors[name].is_float:
            continue  # an integer buffer the base was saved without: nothing to merge
        problems.append(Problem("not in the base model", model=task.name, tensor=name))
    return capped(problems, task.name)


def lora_adapter_problems(base: Checkpoint, base_identity: set[str], task: TaskInput
                          ) -> list[Problem]:
    """Adapter trained on this base: its name, and every target present with the right shape."""
    adapter = task.model
    assert isinstance(adapter, LoraAdapter)
    problems = []
    trained_on = adapter.base_model_name
    if trained_on and not _same_base(trained_on, base_identity):
        problems.append(Problem(f"adapter was trained on {trained_on!r}, but the base is "
                                f"{sorted(base_identity)[0]!r}", model=task.name))
    for target, module in adapter.modules.items():
        info = base.tensors.get(target)
        if info is None:
            problems.append(Problem(f"LoRA target module {module.module} has no weight in the "
                                    "base", model=task.name, tensor=target))
        elif info.shape != (module.out_features, module.in_features):
            problems.append(Problem(
                f"LoRA update has shape {[module.out_features, module.in_features]}, the base "
                f"weight has {list(info.shape)}", model=task.name, tensor=target))
    for target, key in adapter.extras.items():
        info = base.tensors.get(target)
        stored = adapter.tensors[key]
        if info is None:
            problems.append(Problem(f"adapter tensor {key} has no counterpart in the base",
                                    model=task.name, tensor=target))
        elif info.shape != stored.shape:
            problems.append(Problem(f"shape {list(stored.shape)}, the base has "
                                    f"{list(info.shape)}", model=task.name, tensor=target))
    return capped(problems, task.name)


def weight_problems(spec: JobSpec, method: MergeMethod | None) -> list[Problem]:
    """Weights are finite (the schema refuses NaN and Infinity); their sum must not be 0 where
    a method divides by it; a method that has no use for them is given none (a weight it
    ignored would be a setting silently dropped)."""
    if method is None:
        return []
    if not method.uses_weights:
        return [Problem(f"{method.name} does not use per-model weights (it keeps what recovers "
                        f"each task model itself); found weight {m.weight:g}, expected none "
                        "or 1", model=m.source, field=f"models.{i}.weight")
                for i, m in enumerate(spec.models) if m.weight != 1.0]
    if method.name in {"average", "cart"} and sum(m.weight for m in spec.models) == 0:
        return [Problem(f"{method.name} divides by the sum of the weights, which is 0",
                        field="models", also=weight_fields(spec))]
    return []


def weight_fields(spec: JobSpec) -> tuple[str, ...]:
    """The fields of the weights, which a problem of their sum is about."""
    return tuple(f"models.{i}.weight" for i in range(len(spec.models)))


def output_problems(spec: JobSpec, method: MergeMethod | None, is_lora: bool) -> list[Problem]:
    fmt = spec.output.format
    problems = []
    if method is not None and fmt not in method.output_formats:
        allowed = ", ".join(sorted(method.output_formats))
        # artifact formats belong to one method each (rmm: reversible, tsv_compress: compressed)
        writers = sorted(name for name, cls in available().items() if fmt in cls.output_formats)
        hint = f"; format {fmt!r} is written by: {', '.join(writers)}" \
            if writers and fmt in ARTIFACT_FORMATS else ""
        problems.append(Problem(f"method {method.name} cannot produce format {fmt!r} "
                                f"(it produces: {allowed}){hint}", field="output.format"))
    if fmt == "lora" and not is_lora:
        problems.append(Problem("format 'lora' needs LoRA adapters as inputs; the inputs are "
                                "full checkpoints", field="output.format"))
    if spec.output.destination is None:
        problems.append(Problem("no destination: set output.destination or pass --out",
                                field="output.destination"))
    if spec.calibration and (method is None or method.name != "adarank"):
        problems.append(Problem("calibration data is only used by methods that need data "
                                "(adarank)", field="calibration"))
    return problems


_FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}


def quantized_problems(tensors: dict[str, TensorInfo], label: str) -> list[Problem]:
    """FP8 checkpoints store weights with separate scales (`weight_scale_inv`, per block):
    merged as they are, the task vectors would be wrong and the scales cast to FP8."""
    found = sorted(name for name, info in tensors.items() if info.dtype in _FLOAT8)
    if not found:
        return []
    dtype = str(tensors[found[0]].dtype).removeprefix("torch.")
    return [Problem(f"{len(found)} FP8 tensor(s) ({dtype}; e.g. {found[0]}): FP8-quantized "
                    "checkpoints cannot be merged; dequantize to bfloat16 or float32 first",
                    model=label, tensor=found[0])]


def resolved_path(given: str, field: str, model: str | None = None
                  ) -> tuple[Path | None, list[Problem]]:
    """The absolute path a spec's local path names (`~` expanded, links followed)."""
    try:
        return Path(given).expanduser().resolve(), []
    except (RuntimeError, OSError, ValueError) as exc:  # `~nosuchuser`, a loop of links, NUL
        return None, [Problem(f"cannot use the path {given!r}: {exc}", model=model,
                              field=field)]


class LocalPath(NamedTuple):
    field: str
    path: str
    model: str | None = None  # the task model it belongs to


def local_paths(spec: JobSpec) -> list[LocalPath]:
    """Every local path a spec reads or writes: the base and models that are not Hub ids, a
    local destination, the calibration files."""
    found = [LocalPath("base", spec.base, "base")] if looks_local(spec.base) else []
    found += [LocalPath(f"models.{i}.source", m.source, name)
              for i, (m, name) in enumerate(zip(spec.models, spec.task_names(), strict=True))
              if looks_local(m.source)]
    destination = spec.output.destination
    if destination and not destination.startswith("hub://"):
        found.append(LocalPath("output.destination", destination))
    found += [LocalPath(f"calibration.{task}.path", source.path)
              for task, source in (spec.calibration or {}).items()]
    return found


def under_roots(path: Path, roots: list[Path]) -> bool:
    """`path` (absolute, links resolved) is one of `roots` or lies below one."""
    return any(path == root or root in path.parents for root in roots)


def outside_roots_problems(paths: list[LocalPath], roots: list[Path]) -> list[Problem]:
    """The paths (links followed) under none of `roots`: a service configured with
    `MERGE_SERVICE_LOCAL_ROOTS` reads and writes nowhere else for the specs it is sent."""
    problems = []
    allowed = ", ".join(str(root) for root in roots)
    for field, given, model in paths:
        path, unusable = resolved_path(given, field, model)
        problems += unusable
        if path is not None and not under_roots(path, roots):
            problems.append(Problem(f"{given} is outside the directories this service may "
                                    f"use (MERGE_SERVICE_LOCAL_ROOTS: {allowed})", model=model,
                                    field=field))
    return problems


def destination_input_problems(destination: Path, inputs: list[tuple[str, Path]],
                               overwrite: bool) -> list[Problem]:
    """The output goes beside the inputs, never into one (the base's other files are copied
    into outputs, so a later merge would carry this one's output along), and `--overwrite`
    replaces the destination whole: never when that would delete an input or the directory
    the command runs in (an empty `--out ''` once meant the current one)."""
    problems = []
    for label, path in inputs:
        path = path.resolve()
        if path in destination.parents:
            problems.append(Problem(f"the destination {destination} is inside the input "
                                    f"{path}: write it beside the inputs", model=label,
                                    field="output.destination"))
    if not overwrite:
        return problems
    for label, path in [*inputs, ("the current directory", Path.cwd())]:
        path = path.resolve()
        if path == destination or destination in path.parents:
            where = "is" if path == destination else "holds"
            problems.append(Problem(
                f"--overwrite would delete {path}: the destination {destination} {where} it",
                model=label if label != "the current directory" else None,
                field="output.destination"))
    return problems


def selection_problems(spec: JobSpec, names: list[str]) -> list[Problem]:
    """An include/exclude that selects nothing is almost always a typo."""
    problems = []
    for key in ("include", "exclude"):
        for pattern in getattr(spec.options, key):
            if not any(re.search(pattern, n) for n in names):
                problems.append(Problem(f"regex {pattern!r} matches no tensor of the base",
                                        field=f"options.{key}"))
    return problems


def base_identity(source: ResolvedSource) -> set[str]:
    """Names an adapter's `base_model_name_or_path` may use for this base."""
    names = {source.source.split("@", 1)[0], str(source.path)}
    if source.repo_id:
        names.add(source.repo_id)
    config = source.path / "config.json"
    if config.is_file():
        import json

        try:
            name_or_path = json.loads(config.read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            name_or_path = None
        if isinstance(name_or_path, str) and name_or_path:
            names.add(name_or_path)
    title = model_card_title(source.path / "README.md")
    if title:
        names.add(title)
    return names


def _same_base(trained_on: str, identity: set[str]) -> bool:
    """Same repo id, same path, or the same repo name (a local copy of `org/name`)."""
    if trained_on in identity:
        return True
    try:
        if str(Path(trained_on).expanduser().resolve()) in identity:
            return True
    except (OSError, RuntimeError):
        pass
    leaf = trained_on.rstrip("/").rsplit("/", 1)[-1]
    return any(n.rstrip("/").rsplit("/", 1)[-1] == leaf for n in identity)


