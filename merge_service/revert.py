"""`revert`: recover one task model from a `compressed` (or `reversible`) artifact."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from merge_service.engine import MergeResult, Progress, ProgressCallback
from merge_service.errors import InvalidInputError, Problem
from merge_service.methods import get_method_class
from merge_service.sinks.local import LocalDirectorySink, copy_model_files, destination_problems
from merge_service.sinks.model_card import render_model_card
from merge_service.sinks.report import write_json
from merge_service.sinks.safetensors_writer import ShardedSafetensorsWriter
from merge_service.sources.checkpoint import Checkpoint
from merge_service.sources.resolve import HubOptions, resolve_source
from merge_service.spec import load_spec


def revert(artifact_dir: Path, task: str, out: Path, *, overwrite: bool = False,
           hub: HubOptions | None = None, progress: ProgressCallback | None = None,
           shard_bytes: int = 5 * 10**9) -> MergeResult:
    report = progress or (lambda _p: None)
    started = time.perf_counter()
    manifest_path = artifact_dir / "tasks.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        tasks: list[str] = manifest["tasks"]
        fmt: str = manifest["format"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InvalidInputError(Problem(f"{artifact_dir} is not a compressed or reversible "
                                        "artifact (no valid tasks.json)")) from None
    if task not in tasks:
        raise InvalidInputError(Problem(f"no task {task!r} in the artifact (tasks: "
                                        f"{', '.join(tasks)})", field="--task"))
    method = get_method_class(manifest.get("method", ""))
    if method is None:
        raise InvalidInputError(Problem(f"artifact written by unknown method "
                                        f"{manifest.get('method')!r}"))
    problems = destination_problems(out, overwrite)
    spec = load_spec(artifact_dir / "merge_spec.yaml")
    base_source, source_problems = resolve_source(spec.base, "base", hub or HubOptions())
    problems += source_problems
    base = stored = None
    if base_source is not None:
        base, base_problems = Checkpoint.open(base_source.path, "base")
        problems += base_problems
    stored, stored_problems = Checkpoint.open(artifact_dir, "artifact", prefix=fmt)
    problems += stored_problems
    if problems or base is None or stored is None or base_source is None:
        raise InvalidInputError(problems)

    index = str(tasks.index(task))
    parts: dict[str, dict[str, str]] = defaultdict(dict)
    for key in stored.tensors:
        tensor_name, task_index, part = key.rsplit("::", 2)
        if task_index == index:
            parts[tensor_name][part] = key
    out_dtype = stored.floating_dtype() if parts else base.floating_dtype()
    names = sorted(base.tensors)
    sink = LocalDirectorySink(out, overwrite=overwrite)
    with sink as tmp:
        writer = ShardedSafetensorsWriter(tmp, "model", shard_bytes)
        for done, name in enumerate(names):
            report(Progress("reverting", done, len(names), name))
            value = base.get(name)
            if name in parts:
                delta = method.reconstruct({p: stored.get(k).to(torch.float32)
                                            for p, k in parts[name].items()})
                value = value.to(torch.float32).add_(delta)
            writer.add(name, value.to(out_dtype) if value.is_floating_point() else value)
        files = writer.finish() + copy_model_files(base_source.path, tmp)
        result_report = {"reverted_task": task, "artifact": str(artifact_dir),
                         "format": fmt, "method": method.name,
                         "timings_s": {"total_s": round(time.perf_counter() - started, 4)}}
        write_json(tmp / "merge_report.json", result_report)
        (tmp / "README.md").write_text(render_model_card(
            title=f"{task} recovered from a {fmt} artifact", base_model=spec.base,
            relation="merge", method=method.name, params={"task": task},
            inputs=[{"name": m.name or task, "source": m.source, "weight": m.weight}
                    for m in spec.models if m.name == task], output_format="full"))
        files += ["merge_report.json", "README.md"]
        sink.commit()
    base.close()
    stored.close()
    return MergeResult(out, sorted(files), result_report, spec)
