"""The one way in: `run_merge(spec)` resolves, checks, streams and writes a merge.

Work goes tensor by tensor (LoRA: module by module). At any time the engine holds one tensor
of the base, one of each task, and the method's output: peak memory is bounded by the largest
tensor times the number of models, never by the model size. The output is written to a
temporary sibling of the destination and renamed at the end.
"""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_service import __version__
from merge_service.errors import MergeCancelled, MergeRuntimeError, PreflightError, Problem
from merge_service.inputs import TaskInput
from merge_service.methods import MergeMethod, TensorTask, build_method
from merge_service.preflight import (
    base_identity,
    effective_space,
    full_checkpoint_problems,
    input_kind_problems,
    lora_adapter_problems,
    output_problems,
    resolve_device,
    selection_problems,
    weight_problems,
)
from merge_service.sinks.local import LocalDirectorySink, copy_model_files, destination_problems
from merge_service.sinks.model_card import render_model_card
from merge_service.sinks.report import write_json
from merge_service.sinks.safetensors_writer import ShardedSafetensorsWriter
from merge_service.sources.checkpoint import Checkpoint
from merge_service.sources.lora import LoraAdapter, is_adapter_dir
from merge_service.sources.resolve import HubOptions, ResolvedSource, resolve_source
from merge_service.spec import JobSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass(frozen=True)
class Progress:
    stage: str  # resolving | preflight | merging | finalizing
    done: int
    total: int
    current: str | None = None


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


@dataclass
class MergeResult:
    destination: Path
    files: list[str]
    report: dict[str, Any]
    spec: JobSpec  # resolved: sources pinned


@dataclass
class PreparedMerge:
    """A spec that passed preflight, with its sources open and its work planned."""

    spec: JobSpec
    resolved_spec: JobSpec
    base_source: ResolvedSource
    base: Checkpoint
    inputs: list[TaskInput]
    method: MergeMethod
    space: str
    device: torch.device
    compute_dtype: torch.dtype
    output_dtype: torch.dtype
    destination: Path
    merged: list[str]  # tensor names the method runs on
    copied: list[str]  # tensor names copied from the base
    timings: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        self.base.close()
        for task in self.inputs:
            task.close()


def prepare(spec: JobSpec, *, overwrite: bool = False, hub: HubOptions | None = None,
            progress: ProgressCallback | None = None) -> PreparedMerge:
    """Resolve every source and run every preflight check; raise `PreflightError` with all
    problems found. Reads only headers and configs."""
    hub = hub or HubOptions()
    report = progress or (lambda _p: None)
    started = time.perf_counter()
    problems: list[Problem] = []

    method, method_problems = build_method(spec.method.name, spec.method.params)
    problems += method_problems
    device, device_problems = resolve_device(spec.options.device)
    problems += device_problems
    problems += weight_problems(spec, method)
    if spec.output.destination and not spec.output.destination.startswith("hub://"):
        problems += destination_problems(Path(spec.output.destination).expanduser(), overwrite)

    sources = [spec.base] + [m.source for m in spec.models]
    labels = ["base", *spec.task_names()]
    resolved: list[ResolvedSource | None] = []
    for i, (source, label) in enumerate(zip(sources, labels, strict=True)):
        report(Progress("resolving", i, len(sources), source))
        found, source_problems = resolve_source(source, label, hub)
        resolved.append(found)
        problems += source_problems
    resolve_s = time.perf_counter() - started
    report(Progress("preflight", 0, 1, None))

    base: Checkpoint | None = None
    if resolved[0] is not None:
        if is_adapter_dir(resolved[0].path):
            problems.append(Problem("the base must be a full model, not a LoRA adapter",
                                    model="base"))
        else:
            base, base_problems = Checkpoint.open(resolved[0].path, "base")
            problems += base_problems

    inputs: list[TaskInput] = []
    for entry, label, found in zip(spec.models, labels[1:], resolved[1:], strict=True):
        if found is None:
            continue
        model: Checkpoint | LoraAdapter | None
        if is_adapter_dir(found.path):
            model, open_problems = LoraAdapter.open(found.path, label,
                                                    set(base.tensors) if base else set())
        else:
            model, open_problems = Checkpoint.open(found.path, label)
        problems += open_problems
        if model is not None:
            inputs.append(TaskInput(label, found, entry.weight, model))

    is_lora = bool(inputs) and all(i.is_lora for i in inputs)
    problems += input_kind_problems(inputs, spec)
    problems += output_problems(spec, method, is_lora)
    if base is not None and resolved[0] is not None:
        identity = base_identity(resolved[0])
        for task in inputs:
            problems += (lora_adapter_problems(base, identity, task) if task.is_lora
                         else full_checkpoint_problems(base, task))
        problems += selection_problems(spec, list(base.tensors))

    if problems or method is None or device is None or base is None:
        for task in inputs:
            task.close()
        raise PreflightError(problems or [Problem("preflight failed")])

    merged, copied = _plan(spec, base, inputs)
    resolved_spec = _pinned_spec(spec, resolved)  # type: ignore[arg-type]
    out_dtype = _DTYPES[spec.output.dtype] if spec.output.dtype else base.floating_dtype()
    prepared = PreparedMerge(
        spec=spec, resolved_spec=resolved_spec, base_source=resolved[0],  # type: ignore[arg-type]
        base=base, inputs=inputs, method=method, space=effective_space(spec, is_lora),
        device=device, compute_dtype=_DTYPES[spec.options.compute_dtype], output_dtype=out_dtype,
        destination=Path(spec.output.destination).expanduser().resolve(),  # type: ignore[arg-type]
        merged=merged, copied=copied,
    )
    prepared.timings["resolve_s"] = resolve_s
    prepared.timings["preflight_s"] = time.perf_counter() - started - resolve_s
    report(Progress("preflight", 1, 1, None))
    return prepared


def run_merge(spec: JobSpec, *, overwrite: bool = False, hub: HubOptions | None = None,
              progress: ProgressCallback | None = None,
              should_cancel: CancelCheck | None = None) -> MergeResult:
    """Validate, merge and write `spec`. The CLI, the workers and the tests all call this."""
    prepared = prepare(spec, overwrite=overwrite, hub=hub, progress=progress)
    try:
        return execute(prepared, overwrite=overwrite, progress=progress,
                       should_cancel=should_cancel)
    finally:
        prepared.close()


def execute(prepared: PreparedMerge, *, overwrite: bool = False,
            progress: ProgressCallback | None = None,
            should_cancel: CancelCheck | None = None) -> MergeResult:
    report = progress or (lambda _p: None)
    cancelled = should_cancel or (lambda: False)
    p = prepared
    started = time.perf_counter()
    fmt = p.spec.output.format
    tensor_report: dict[str, dict[str, Any]] = {}
    sink = LocalDirectorySink(p.destination, overwrite=overwrite)
    with sink as tmp:
        writer = ShardedSafetensorsWriter(tmp, "model", p.spec.output.shard_bytes) \
            if p.method.produces_delta else None
        artifact = None if p.method.produces_delta else \
            ShardedSafetensorsWriter(tmp, fmt, p.spec.output.shard_bytes)
        order = sorted(p.merged + p.copied)
        merged = set(p.merged)
        total = len(order)
        for done, name in enumerate(order):
            if cancelled():
                raise MergeCancelled(f"cancelled after {done} of {total} tensors")
            report(Progress("merging", done, total, name))
            if name in merged:
                tensor_report[name] = _merge_tensor(p, name, writer, artifact)
            elif writer is not None:
                writer.add(name, _cast_output(p.base.get(name), p.output_dtype))
        report(Progress("merging", total, total, None))
        merge_s = time.perf_counter() - started

        report(Progress("finalizing", 0, 1, None))
        files = []
        if writer is not None:
            files += writer.finish()
        if artifact is not None:
            files += artifact.finish()
            write_json(tmp / "tasks.json", {
                "format": fmt, "method": p.method.name,
                "tasks": [t.name for t in p.inputs], "base": p.resolved_spec.base,
            })
            files.append("tasks.json")
        if fmt == "full":
            files += copy_model_files(p.base_source.path, tmp)
        (tmp / "merge_spec.yaml").write_text(p.resolved_spec.to_yaml())
        timings = {**p.timings, "merge_s": merge_s,
                   "finalize_s": time.perf_counter() - started - merge_s}
        timings["total_s"] = sum(timings.values())
        full_report = _report(p, tensor_report, timings, writer, artifact)
        write_json(tmp / "merge_report.json", full_report)
        (tmp / "README.md").write_text(_model_card(p))
        files += ["merge_spec.yaml", "merge_report.json", "README.md"]
        if cancelled():
            raise MergeCancelled("cancelled while finalizing")
        try:
            sink.commit()
        except OSError as exc:
            raise MergeRuntimeError(f"cannot move the output into place: {exc}") from exc
    report(Progress("finalizing", 1, 1, None))
    return MergeResult(p.destination, sorted(files), full_report, p.resolved_spec)


def _merge_tensor(p: PreparedMerge, name: str, writer: ShardedSafetensorsWriter | None,
                  artifact: ShardedSafetensorsWriter | None) -> dict[str, Any]:
    base = p.base.get(name).to(p.device, p.compute_dtype)
    vectors, weights, names = [], [], []
    for task in p.inputs:
        tv = task.task_vector(name, base)
        vectors.append(tv)
        weights.append(task.weight)
        names.append(task.name)
    if all(v is None or not bool(v.any()) for v in vectors):
        # METHODS.md section 0: a tensor whose deltas are all zero is copied.
        if writer is not None:
            writer.add(name, _cast_output(p.base.get(name), p.output_dtype))
        return {"action": "unchanged"}
    vectors = [torch.zeros_like(base) if v is None else v for v in vectors]
    task = TensorTask(name=name, task_vectors=vectors, weights=weights, task_names=names,
                      seed=p.spec.options.seed, is_2d=base.dim() == 2)
    result = p.method.merge(task)
    del vectors, task.task_vectors
    if writer is not None:
        if result.delta is None:
            raise MergeRuntimeError(f"method {p.method.name} returned no delta for {name}")
        writer.add(name, _cast_output(base.add_(result.delta), p.output_dtype))
    if artifact is not None:
        for key, value in result.artifact.items():
            artifact.add(f"{name}::{key}", _cast_output(value, p.output_dtype))
    return {"action": "merged", **task.diagnostics}


def _cast_output(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to("cpu", dtype) if tensor.dtype.is_floating_point else tensor.to("cpu")


def _plan(spec: JobSpec, base: Checkpoint, inputs: list[TaskInput]) -> tuple[list[str],
                                                                               list[str]]:
    """Which tensors the method runs on; the others are copied from the base."""
    include = [re.compile(p) for p in spec.options.include]
    exclude = [re.compile(p) for p in spec.options.exclude]
    merged, copied = [], []
    for name, info in base.tensors.items():
        selected = (not include or any(r.search(name) for r in include)) \
            and not any(r.search(name) for r in exclude)
        touched = any(task.touches(name) for task in inputs)
        (merged if selected and touched and info.is_float else copied).append(name)
    return merged, copied


def _pinned_spec(spec: JobSpec, resolved: list[ResolvedSource]) -> JobSpec:
    models = [m.model_copy(update={"source": r.pinned, "name": n})
              for m, r, n in zip(spec.models, resolved[1:], spec.task_names(), strict=True)]
    return spec.model_copy(update={"base": resolved[0].pinned, "models": models})


def _peak_memory(device: torch.device) -> dict[str, int]:
    peak = {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def _report(p: PreparedMerge, tensors: dict[str, dict[str, Any]], timings: dict[str, float],
            writer: ShardedSafetensorsWriter | None,
            artifact: ShardedSafetensorsWriter | None) -> dict[str, Any]:
    out_bytes = (writer.total_bytes if writer else 0) + (artifact.total_bytes if artifact else 0)
    report: dict[str, Any] = {
        "merge_service_version": __version__,
        "method": {"name": p.method.name, "params": p.method.params.model_dump(mode="json")},
        "space": p.space,
        "base": {"source": p.resolved_spec.base, "revision": p.base_source.revision},
        "models": [{"name": t.name, "source": t.source.pinned, "revision": t.source.revision,
                    "weight": t.weight, "kind": "lora" if t.is_lora else "full"}
                   for t in p.inputs],
        "device": str(p.device),
        "compute_dtype": str(p.compute_dtype).removeprefix("torch."),
        "output": {"format": p.spec.output.format,
                   "dtype": str(p.output_dtype).removeprefix("torch."), "bytes": out_bytes},
        "summary": {
            "merged": sum(1 for t in tensors.values() if t["action"] == "merged"),
            "unchanged": sum(1 for t in tensors.values() if t["action"] == "unchanged"),
            "copied": len(p.copied),
        },
        "tensors": tensors,
        "copied_tensors": sorted(p.copied),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "peak_memory": _peak_memory(p.device),
    }
    if artifact is not None:
        # against keeping every task model whole, in the output dtype
        whole = len(p.inputs) * sum(i.numel for i in p.base.tensors.values()) \
            * p.output_dtype.itemsize
        report["output"]["size_ratio"] = round(artifact.total_bytes / whole, 6) if whole else 0
    return report


def _model_card(p: PreparedMerge) -> str:
    relation = "adapter" if p.spec.output.format == "lora" else "merge"
    return render_model_card(
        title=p.spec.name or f"{p.method.name} merge",
        base_model=p.resolved_spec.base.split("@", 1)[0] if p.base_source.repo_id
        else p.resolved_spec.base,
        relation=relation, method=p.method.name,
        params=p.method.params.model_dump(mode="json"),
        inputs=[{"name": t.name, "source": t.source.pinned, "weight": t.weight}
                for t in p.inputs],
        output_format=p.spec.output.format,
    )
