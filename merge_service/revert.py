"""`revert`: recover one task model from a `compressed` or `reversible` artifact.

The output is always a full model `θ0 + τ̂_t` (METHODS.md sections 6 and 13), loadable by
`transformers`, also for a `reversible` artifact of LoRA adapters: `τ̂_t` there is
`U_B (μ + Σ_j c_tj Φ_j) V_Aᵀ`, of rank up to Σr rather than the adapter's own r_t, so an adapter
would not be the task's adapter anyway, and a full model is what every consumer loads.
Work goes tensor by tensor; the directory is written to a temporary sibling and renamed at the
end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from merge_service.engine import MergeResult, Progress, ProgressCallback
from merge_service.errors import InvalidInputError, Problem, capped
from merge_service.preflight import destination_input_problems
from merge_service.sinks.artifact import Artifact
from merge_service.sinks.local import LocalDirectorySink, copy_model_files, destination_problems
from merge_service.sinks.model_card import card_base_model, hub_model_id, render_model_card
from merge_service.sinks.report import write_json
from merge_service.sinks.safetensors_writer import ShardedSafetensorsWriter
from merge_service.sources.checkpoint import Checkpoint
from merge_service.sources.resolve import HubOptions, ResolvedSource, resolve_source
from merge_service.spec import JobSpec, load_spec


def revert(artifact_dir: Path, task: str, out: Path | str, *, overwrite: bool = False,
           hub: HubOptions | None = None, progress: ProgressCallback | None = None,
           shard_bytes: int = 5 * 10**9) -> MergeResult:
    """Write task `task`'s model, rebuilt from the artifact and its base, to `out`.

    Every part the model is rebuilt from is checked against the base, from the headers,
    before anything is written.
    """
    report = progress or (lambda _p: None)
    started = time.perf_counter()
    artifact = Artifact.open(artifact_dir)
    base: Checkpoint | None = None
    try:
        problems: list[Problem] = []
        if task not in artifact.tasks:
            problems.append(Problem(f"no task {task!r} in the artifact (tasks: "
                                    f"{', '.join(artifact.tasks)})", field="--task"))
        # `Path("")` is the working directory, which exists: an empty `--out` is named as such
        destination = Path(out).resolve() if str(out) else None
        if destination is None:
            problems.append(Problem("the destination is empty: give a directory for the "
                                    "recovered model", field="--out"))
        else:
            problems += _as_out(destination_problems(destination, overwrite))
        try:
            spec = load_spec(artifact_dir / "merge_spec.yaml")
        except InvalidInputError as exc:
            raise InvalidInputError([*problems, *(Problem(
                f"the artifact's merge_spec.yaml: {p}", model="artifact")
                for p in exc.problems)]) from None
        base_source, source_problems = resolve_source(spec.base, "base", hub or HubOptions())
        problems += source_problems
        if destination is not None:
            inputs = [("artifact", artifact_dir)] + (
                [("base", base_source.path)] if base_source is not None else [])
            problems += _as_out(destination_input_problems(destination, inputs, overwrite))
        if base_source is not None:
            base, base_problems = Checkpoint.open(base_source.path, "base")
            problems += base_problems
        parts = artifact.parts(task) if task in artifact.tasks else {}
        if base is not None:
            part_problems = []
            for name in sorted(parts):
                info = base.tensors.get(name)
                if info is None:
                    part_problems.append(Problem("stored in the artifact but not a tensor of "
                                                 "the base", model="artifact", tensor=name))
                elif not info.is_float:  # a merge copies such tensors, it never stores them
                    part_problems.append(Problem(f"stored in the artifact, but the base tensor "
                                                 f"is {info.dtype}, not floating point",
                                                 model="artifact", tensor=name))
                else:
                    part_problems += artifact.part_problems(name, parts[name], info.shape)
            problems += capped(part_problems, "artifact")
        if problems or base is None or base_source is None or destination is None:
            raise InvalidInputError(problems)
        return _write(artifact, base, base_source, spec, task, parts, destination, overwrite,
                      report, shard_bytes, started)
    finally:
        artifact.close()
        if base is not None:
            base.close()


def _as_out(problems: list[Problem]) -> list[Problem]:
    """The destination checks a merge shares name `output.destination`; revert's is `--out`."""
    return [replace(p, field="--out") if p.field == "output.destination" else p
            for p in problems]


def _write(artifact: Artifact, base: Checkpoint, base_source: ResolvedSource, spec: JobSpec,
           task: str, parts: dict[str, dict[str, str]], out: Path, overwrite: bool,
           report: ProgressCallback, shard_bytes: int, started: float) -> MergeResult:
    # exact sums in the artifact's precision, never below float32
    work = torch.float64 if torch.float64 in (artifact.floating_dtype(),
                                              base.floating_dtype()) else torch.float32
    names = sorted(base.tensors)
    sink = LocalDirectorySink(out, overwrite=overwrite)
    with sink as tmp:
        writer = ShardedSafetensorsWriter(tmp, "model", shard_bytes, expected=names)
        for done, name in enumerate(names):
            report(Progress("reverting", done, len(names), name))
            value = base.get(name)  # a tensor the artifact does not cover: as in the base
            if name in parts:
                # a recovered tensor in the dtype the merge stored its parts in
                out_dtype = artifact.tensors[next(iter(parts[name].values()))].dtype
                delta = artifact.task_delta(name, parts[name], work)
                value = value.to(work).add_(delta).to(out_dtype)
            writer.add(name, value)
        report(Progress("reverting", len(names), len(names), None))
        files = writer.finish() + copy_model_files(base_source.path, tmp)
        result_report = {"reverted_task": task, "artifact": str(artifact.directory),
                         "format": artifact.fmt, "method": artifact.method.name,
                         "tensors_rebuilt": len(parts),
                         "timings_s": {"total_s": round(time.perf_counter() - started, 4)}}
        write_json(tmp / "merge_report.json", result_report)
        (tmp / "README.md").write_text(render_model_card(
            title=f"{task} recovered from a {artifact.fmt} artifact",
            # the artifact's card names the base as the merge's inputs did
            base_model=hub_model_id(base_source.repo_id, base_source.path,
                                    [card_base_model(artifact.directory / "README.md")]),
            base=spec.base, relation="finetune", library="transformers",
            method=artifact.method.name, params={"task": task},
            inputs=[{"name": m.name or task, "source": m.source, "weight": m.weight}
                    for m in spec.models if m.name == task], output_format="full"))
        # the spec of the merge that made the artifact: with `task`, all it takes to rebuild
        (tmp / "merge_spec.yaml").write_text(spec.to_yaml())
        files += ["merge_report.json", "README.md", "merge_spec.yaml"]
        sink.commit()
    return MergeResult(out, sorted(files), result_report, spec)
