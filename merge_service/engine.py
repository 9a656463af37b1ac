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
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from merge_service import __version__
from merge_service.errors import (
    MergeCancelled,
    MergeRuntimeError,
    NonFiniteResultError,
    PreflightError,
    Problem,
)
from merge_service.inputs import TaskInput
from merge_service.methods import (
    MergeMethod,
    SumOfTerms,
    TensorTask,
    WholeModelMethod,
    build_method,
)
from merge_service.preflight import (
    base_identity,
    destination_input_problems,
    effective_space,
    full_checkpoint_problems,
    input_kind_problems,
    lora_adapter_problems,
    output_problems,
    quantized_problems,
    resolve_device,
    resolved_path,
    selection_problems,
    space_problems,
    weight_problems,
)
from merge_service.sinks.artifact import ARTIFACT_FORMATS, ArtifactWriter
from merge_service.sinks.hub import HubPush, hub_destination_problems, push_to_hub
from merge_service.sinks.local import LocalDirectorySink, copy_model_files, destination_problems
from merge_service.sinks.model_card import hub_model_id, render_model_card
from merge_service.sinks.peft_adapter import PeftAdapterWriter
from merge_service.sinks.report import write_json
from merge_service.sinks.safetensors_writer import ShardedSafetensorsWriter
from merge_service.sources.checkpoint import Checkpoint
from merge_service.sources.lora import LoraAdapter, LoraModule, is_adapter_dir
from merge_service.sources.resolve import (
    HubOptions,
    ResolvedSource,
    looks_local,
    resolve_source,
)
from merge_service.spaces import CoreSpace, KnotsSpace, core_space, knots_space
from merge_service.spec import JobSpec

# the next tensor is read in a thread while the current one merges when all its inputs
# together are at most this big (a layer's matrices); bigger ones (embeddings) only get the
# kernel's read-ahead, so that reading ahead never holds a second copy of the largest tensor
READ_AHEAD_BYTES = 256 * 2**20
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass(frozen=True)
class Progress:
    stage: str  # resolving | preflight | merging | finalizing | pushing (hub:// destinations)
    # adarank adds factorizing (per tensor) and optimizing (per step) before merging
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
    url: str | None = None  # hub:// destinations: the commit (or pull request) URL
    revision: str | None = None  # hub:// destinations: the commit sha


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
    target_rank: int | None
    device: torch.device
    compute_dtype: torch.dtype
    output_dtype: torch.dtype | None  # None: each tensor in its base tensor's dtype
    destination: Path
    merged: list[str]  # tensor names the method runs on
    copied: list[str]  # tensor names copied from the base
    timings: dict[str, float] = field(default_factory=dict)
    push: HubPush | None = None  # hub:// destinations: `destination` is a staging directory

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype tensor `name` (of the base) is written in: `output.dtype`, else its own."""
        return self.output_dtype or self.base.tensors[name].dtype

    def close(self) -> None:
        self.base.close()
        for task in self.inputs:
            task.close()
        if self.push is not None:
            self.push.cleanup()


def prepare(spec: JobSpec, *, overwrite: bool = False, hub: HubOptions | None = None,
            progress: ProgressCallback | None = None, weights: bool = True,
            should_cancel: CancelCheck | None = None) -> PreparedMerge:
    """Resolve every source and run every preflight check; raise `PreflightError` with all
    problems found. Reads only headers and configs. `weights=False`: a check and no merge to
    follow here, so Hub sources are fetched as their safetensors headers only
    (`resolve_source`); the result then only tells the problems and the pinned spec."""
    hub = hub or HubOptions()
    report = progress or (lambda _p: None)
    started = time.perf_counter()
    problems: list[Problem] = []

    method_params = dict(spec.method.params)
    target_rank = method_params.pop("target_rank", None)  # a parameter of the `lora` output
    method, method_problems = build_method(spec.method.name, method_params)
    problems += method_problems
    device, device_problems = resolve_device(spec.options.device)
    problems += device_problems
    problems += weight_problems(spec, method)
    push, local = None, None
    destination = spec.output.destination
    if destination is not None and not destination.strip():
        problems.append(Problem("output.destination is empty: give a directory or "
                                "hub://org/name", field="output.destination"))
    elif destination and destination.startswith("hub://"):
        problems += hub_destination_problems(destination, hub)
        push = HubPush.plan(destination, spec.output.private, spec.output.create_pr, hub)
    elif destination:
        local, local_problems = resolved_path(destination, "output.destination")
        problems += local_problems
        if local is not None:
            problems += destination_problems(local, overwrite)

    sources = [spec.base] + [m.source for m in spec.models]
    labels = ["base", *spec.task_names()]
    resolved: list[ResolvedSource | None] = []
    for i, (source, label) in enumerate(zip(sources, labels, strict=True)):
        if should_cancel is not None and should_cancel():  # before each download
            raise MergeCancelled(f"cancelled while resolving the sources ({i} of "
                                 f"{len(sources)})")
        report(Progress("resolving", i, len(sources), source))
        found, source_problems = resolve_source(source, label, hub, weights=weights)
        resolved.append(found)
        problems += source_problems
    report(Progress("resolving", len(sources), len(sources), None))
    if local is not None:
        problems += destination_input_problems(
            local, [(label, found.path) for label, found in zip(labels, resolved, strict=True)
                    if found], overwrite)
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
            if base is not None:
                problems += quantized_problems(base.tensors, "base")

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
            problems += quantized_problems(model.tensors, label)
            inputs.append(TaskInput(label, found, entry.weight, model))

    is_lora = bool(inputs) and all(i.is_lora for i in inputs)
    space = effective_space(spec, is_lora)
    if is_lora and spec.space == "auto" and isinstance(method, WholeModelMethod):
        space = "full"  # adarank factors LoRA inputs itself (from B_t, A_t), in full space
    problems += input_kind_problems(inputs, spec)
    problems += output_problems(spec, method, is_lora)
    problems += space_problems(spec, method, space, is_lora, target_rank)
    unmatched: list[Problem] = []
    if base is not None and resolved[0] is not None:
        identity = base_identity(resolved[0])
        for task in inputs:
            problems += (lora_adapter_problems(base, identity, task) if task.is_lora
                         else full_checkpoint_problems(base, task))
        unmatched = selection_problems(spec, list(base.tensors))
        problems += unmatched
    plan = _plan(spec, base, inputs) if base is not None else None
    if plan is not None and inputs and not plan[0] and not unmatched:
        problems.append(_nothing_to_merge(spec))  # a regex that matches nothing says why
    if isinstance(method, WholeModelMethod):
        # AdaRank: calibration data, model family, heads, tokenizer (METHODS.md section 12)
        problems += method.whole_model_problems(
            spec, resolved[0].path if base is not None and resolved[0] else None,
            base.tensors if base is not None else None, inputs)

    pinned = [found for found in resolved if found is not None]
    output_dir = push.output_dir if push else local
    if problems or method is None or device is None or base is None \
            or len(pinned) < len(resolved) or output_dir is None:
        for task in inputs:
            task.close()
        raise PreflightError(problems or [Problem("preflight failed")])

    assert plan is not None
    merged, copied = plan
    out_dtype = _DTYPES[spec.output.dtype] if spec.output.dtype else None
    prepared = PreparedMerge(
        spec=spec, resolved_spec=_pinned_spec(spec, pinned, method, target_rank, space),
        base_source=pinned[0], base=base, inputs=inputs, method=method, space=space,
        target_rank=target_rank, device=device,
        compute_dtype=_DTYPES[spec.options.compute_dtype], output_dtype=out_dtype,
        destination=output_dir, merged=merged, copied=copied, push=push,
    )
    prepared.timings["resolve_s"] = resolve_s
    prepared.timings["preflight_s"] = time.perf_counter() - started - resolve_s
    report(Progress("preflight", 1, 1, None))
    return prepared


def run_merge(spec: JobSpec, *, overwrite: bool = False, hub: HubOptions | None = None,
              progress: ProgressCallback | None = None,
              should_cancel: CancelCheck | None = None,
              job_id: str | None = None) -> MergeResult:
    """Validate, merge and write `spec`. The CLI, the workers and the tests all call this.

    With Hub sources, every problem is found on their headers first (`weights=False`), so
    that a spec that fails preflight never downloads a weight. `job_id` (the service's) is
    written into merge_report.json: a rerun of the job tells its own output by it."""
    hub = hub or HubOptions()
    sources = [spec.base, *(m.source for m in spec.models)]
    if hub.headers_dir is not None and not all(looks_local(s) for s in sources):
        prepare(spec, overwrite=overwrite, hub=hub, progress=progress, weights=False,
                should_cancel=should_cancel).close()
    prepared = prepare(spec, overwrite=overwrite, hub=hub, progress=progress,
                       should_cancel=should_cancel)
    try:
        return execute(prepared, overwrite=overwrite, progress=progress,
                       should_cancel=should_cancel, job_id=job_id)
    finally:
        prepared.close()


def execute(prepared: PreparedMerge, *, overwrite: bool = False,
            progress: ProgressCallback | None = None,
            should_cancel: CancelCheck | None = None,
            job_id: str | None = None) -> MergeResult:
    report = progress or (lambda _p: None)
    cancelled = should_cancel or (lambda: False)
    p = prepared
    started = time.perf_counter()
    fmt = p.spec.output.format
    served = _served_format(p)
    tensor_report: dict[str, dict[str, Any]] = {}
    # whole-model methods (adarank) learn the merge first; the loop below writes its tensors
    whole = p.method.optimize(p, report, cancelled) \
        if isinstance(p.method, WholeModelMethod) else None
    order = sorted(p.merged + p.copied)
    sink = LocalDirectorySink(p.destination, overwrite=overwrite)
    with sink as tmp:
        writer = ShardedSafetensorsWriter(tmp, "model", p.spec.output.shard_bytes,
                                          expected=order) if served == "full" else None
        adapter = None
        if served == "lora":
            first = p.inputs[0].model
            assert isinstance(first, LoraAdapter)  # preflight: `lora` only from LoRA inputs
            adapter = PeftAdapterWriter(tmp, first.config, _base_model_name(p),
                                        *_adapter_contents(p))
        artifact = ArtifactWriter(tmp, fmt, p.method.artifact_files,
                                  p.spec.output.shard_bytes) if fmt in ARTIFACT_FORMATS else None
        out = _Outputs(writer, adapter, artifact)
        merged = set(p.merged)
        total = len(order)
        # a failure or cancel leaves at most the next tensor's reads running: the executor
        # waits for them, and closing the inputs drops what they read
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:
            for done, name in enumerate(order):
                if cancelled():
                    raise MergeCancelled(f"cancelled after {done} of {total} tensors")
                report(Progress("merging", done, total, name))
                if done + 1 < total and whole is None:
                    _read_next(p, order[done + 1], order[done + 1] in merged, writer is not None,
                               reader)
                if name not in merged:
                    if writer is not None:
                        writer.add(name, _cast_output(p, name, p.base.get(name), merged=False))
                elif whole is not None:
                    out.add_merged(p, name, whole.tensor(name))
                    tensor_report[name] = whole.info(name)
                elif p.space in {"core", "knots"} and _lora_only(p, name):
                    tensor_report[name] = _merge_lora_module(p, name, out)
                else:
                    tensor_report[name] = _merge_tensor(p, name, out)
        report(Progress("merging", total, total, None))
        merge_s = time.perf_counter() - started

        report(Progress("finalizing", 0, 1, None))
        files = []
        if served == "full":  # first: what the output writes itself wins over the base's files
            files += copy_model_files(p.base_source.path, tmp)
        if writer is not None:
            files += writer.finish()
        if adapter is not None:
            files += adapter.finish()
        if artifact is not None:
            files += artifact.finish({
                "format": fmt, "method": p.method.name,
                "tasks": [t.name for t in p.inputs], "base": p.resolved_spec.base,
                "space": p.space, "served_format": served,
            })
        (tmp / "merge_spec.yaml").write_text(p.resolved_spec.to_yaml())
        timings = {**p.timings, "merge_s": merge_s,
                   "finalize_s": time.perf_counter() - started - merge_s}
        timings["total_s"] = sum(timings.values())
        full_report = _report(p, tensor_report, timings, out)
        if job_id is not None:
            full_report["job_id"] = job_id
        if whole is not None:
            full_report[p.method.name] = whole.report
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
    result = MergeResult(p.destination, sorted(files), full_report, p.resolved_spec)
    if p.push is not None:
        if cancelled():
            raise MergeCancelled("cancelled before pushing")
        report(Progress("pushing", 0, 1, p.push.repo_id))
        commit = push_to_hub(p.destination, p.push, *_commit_message(p))
        report(Progress("pushing", 1, 1, None))
        result.url, result.revision = commit.url, commit.revision
    return result


def _read_next(p: PreparedMerge, name: str, merged: bool, full_output: bool,
               reader: Executor) -> None:
    """Start reading the next tensor wherever the loop will read it: the base's copy for a
    full output, or the base and every full input for a full-space merge (LoRA modules in
    core/knots space read only small factors). Read in `reader` up to `READ_AHEAD_BYTES`,
    else left to the kernel's read-ahead."""
    if not merged:
        checkpoints = [p.base] if full_output else []
    elif p.space in {"core", "knots"} and _lora_only(p, name):
        checkpoints = []
    else:
        checkpoints = [p.base] + [t.model for t in p.inputs if isinstance(t.model, Checkpoint)]
    if sum(c.nbytes_of(name) for c in checkpoints) <= READ_AHEAD_BYTES:
        for checkpoint in checkpoints:
            if name in checkpoint.tensors:
                checkpoint.read_ahead(name, reader)
    else:
        for checkpoint in checkpoints:
            checkpoint.prefetch(name)


def _commit_message(p: PreparedMerge) -> tuple[str, str]:
    """Title and description of the Hub commit: the method and every input, pinned."""
    title = f"merge-service: {p.method.name} merge of {len(p.inputs)} models"
    if p.spec.name:  # e.g. the schedule that submitted the job
        title += f" ({p.spec.name})"
    lines = [f"base: {p.resolved_spec.base}"] + [
        f"- {t.name}: {t.source.pinned} (weight {t.weight:g})" for t in p.inputs]
    return title, "\n".join(lines)


@dataclass
class _Outputs:
    """Where merged tensors go: a full model, a PEFT adapter, and/or an artifact."""

    model: ShardedSafetensorsWriter | None
    adapter: PeftAdapterWriter | None
    artifact: ArtifactWriter | None

    @property
    def total_bytes(self) -> int:
        return sum(w.total_bytes for w in (self.model, self.adapter, self.artifact) if w)

    def add_merged(self, p: PreparedMerge, name: str, value: torch.Tensor,
                   merged: bool = True) -> None:
        """A merged full tensor `θ0 + Δ` (not a LoRA module); `merged=False`: the base's."""
        if self.model is not None:
            self.model.add(name, _cast_output(p, name, value, merged))
        if self.adapter is not None:  # modules_to_save, biases: stored whole, under their key
            self.adapter.add_tensor(_extra_key(p, name), _cast_output(p, name, value, merged))


def _merge_tensor(p: PreparedMerge, name: str, out: _Outputs) -> dict[str, Any]:
    base = p.base.get(name).to(p.device, p.compute_dtype)
    if isinstance(p.method, SumOfTerms):
        return _sum_tensor(p, p.method, name, base, out)
    found = [task.task_vector(name, base) for task in p.inputs]
    if all(v is None or not bool(v.any()) for v in found):
        # METHODS.md section 0: a tensor whose deltas are all zero is copied.
        out.add_merged(p, name, p.base.get(name), merged=False)
        return {"action": "unchanged"}
    vectors = [torch.zeros_like(base) if v is None else v for v in found]
    del found
    # LoRA inputs in core/knots space: the tensors they carry besides LoRA modules follow the
    # method's non-matrix rule (METHODS.md section 10). A weight that one adapter adapts with
    # LoRA and another carries whole has no core form: it is merged as in full space.
    is_2d = base.dim() == 2 and (p.space not in {"core", "knots"}
                                 or _lora_module(p, name) is not None)
    task = TensorTask(name=name, task_vectors=vectors,
                      weights=[i.weight for i in p.inputs],
                      task_names=[i.name for i in p.inputs],
                      seed=p.spec.options.seed, is_2d=is_2d)
    result = p.method.merge(task)
    del vectors, task.task_vectors
    if p.method.produces_delta:
        if result.delta is None:
            raise MergeRuntimeError(f"method {p.method.name} returned no delta for {name}")
        out.add_merged(p, name, base.add_(result.delta))
    if out.artifact is not None:
        for key, value in result.artifact.items():
            out.artifact.add(name, key, _cast_output(p, name, value))
    return {"action": "merged", **task.diagnostics}


def _sum_tensor(p: PreparedMerge, method: SumOfTerms, name: str, base: torch.Tensor,
                out: _Outputs) -> dict[str, Any]:
    """`_merge_tensor` for methods that are a sum of per-task terms: one task vector in memory
    at a time (a zero task still gets its term: DARE records every task's kept fraction)."""
    task = TensorTask(name=name, task_vectors=[], weights=[t.weight for t in p.inputs],
                      task_names=[t.name for t in p.inputs], seed=p.spec.options.seed,
                      is_2d=base.dim() == 2)
    total, changed, scratch = None, False, None
    for t, task_input in enumerate(p.inputs):
        tv = task_input.task_vector(name, base, out=scratch)
        if tv is None:
            tv = torch.zeros_like(base)
        else:
            changed = changed or bool(tv.any())
        total = method.accumulate(total, method.term(task, t, tv), task_input.weight)
        # the next task reads into this one's buffer, unless the running sum lives in it
        scratch = tv if tv is not total else None
        del tv
    if not changed:  # METHODS.md section 0: a tensor whose deltas are all zero is copied
        out.add_merged(p, name, p.base.get(name), merged=False)
        return {"action": "unchanged"}
    assert total is not None
    out.add_merged(p, name, base.add_(method.finish(task, total)))
    return {"action": "merged", **task.diagnostics}


def _lora_module(p: PreparedMerge, name: str) -> LoraModule | None:
    """The LoRA module that adapts `name` in the first adapter that has one."""
    for task in p.inputs:
        module = getattr(task.model, "modules", {}).get(name)
        if module is not None:
            return module
    return None


def _lora_only(p: PreparedMerge, name: str) -> bool:
    """Some adapter adapts `name` with LoRA and none carries it whole."""
    return _lora_module(p, name) is not None and not any(
        name in getattr(task.model, "extras", {}) for task in p.inputs)


def _merge_lora_module(p: PreparedMerge, name: str, out: _Outputs) -> dict[str, Any]:
    """One LoRA module in `core` or `knots` space: the method runs on small matrices."""
    like = torch.empty(0, device=p.device, dtype=p.compute_dtype)
    # a method that takes the weights as coefficients (drm) gets the unweighted factors, with
    # the weights beside them (one that has no use for weights, rmm, is given none: preflight)
    coefficients = p.method.weights_as_coefficients
    inputs = [replace(t, weight=1.0) for t in p.inputs] if coefficients else p.inputs
    factors = [task.lora_factors(name, like) for task in inputs]
    in_features = p.base.tensors[name].shape[1]
    space: CoreSpace | KnotsSpace = core_space(factors) if p.space == "core" \
        else knots_space(factors, in_features)
    small = space.cores if isinstance(space, CoreSpace) else space.blocks
    # weights are folded into the factors: the rule sees w_t = 1 (METHODS.md section 10),
    # unless it takes them as coefficients
    weights = [t.weight for t in p.inputs] if coefficients else [1.0] * len(small)
    task = TensorTask(name=name, task_vectors=small, weights=weights,
                      task_names=[t.name for t in p.inputs], seed=p.spec.options.seed,
                      is_2d=True, factors=space.factors if isinstance(space, CoreSpace)
                      else None)
    result = p.method.merge(task)
    merged = result.delta
    if merged is None:
        raise MergeRuntimeError(f"method {p.method.name} returned no delta for {name}")
    info: dict[str, Any] = {"action": "merged", "space_shape": list(small[0].shape),
                            **task.diagnostics}
    if out.artifact is not None:  # core parts, with the bases that map them back (section 13)
        assert isinstance(space, CoreSpace)
        stored = {**result.artifact, "shared::u_b": space.u_b, "shared::v_a": space.v_a}
        for key, value in stored.items():
            out.artifact.add(name, key, _cast_output(p, name, value))
    if out.adapter is not None:
        assert isinstance(space, CoreSpace)
        a, b = space.to_lora(merged, p.target_rank)
        module = _lora_module(p, name)
        assert module is not None
        out.adapter.add_module(module, _cast_output(p, name, a), _cast_output(p, name, b))
        info["rank"] = a.shape[0]
    if out.model is not None:
        base = p.base.get(name).to(p.device, p.compute_dtype)
        out.model.add(name, _cast_output(p, name, base.add_(space.to_full(merged))))
    return info


def _adapter_contents(p: PreparedMerge) -> tuple[list[LoraModule], list[str]]:
    """What a `lora` output will hold: the merged LoRA modules and the adapter keys of the
    merged tensors the adapters carry whole (`_Outputs.add_merged`)."""
    modules: list[LoraModule] = []
    extra_keys: list[str] = []
    for name in p.merged:
        module = _lora_module(p, name)
        if _lora_only(p, name) and module is not None:
            modules.append(module)
        else:
            extra_keys.append(_extra_key(p, name))
    return modules, extra_keys


def _extra_key(p: PreparedMerge, name: str) -> str:
    """The adapter key of a tensor an adapter carries whole (the first adapter that does)."""
    return next(t.model.extras[name] for t in p.inputs
                if isinstance(t.model, LoraAdapter) and name in t.model.extras)


def _served_format(p: PreparedMerge) -> str | None:
    """The model an output directory serves: `full`, `lora`, or none (`compressed`).
    A `reversible` artifact serves `θ0 + alpha · μ` as a PEFT adapter when it was computed in
    core space, else as a full model (METHODS.md section 13)."""
    fmt = p.spec.output.format
    if fmt == "reversible":
        return "lora" if p.space == "core" else "full"
    return None if fmt in ARTIFACT_FORMATS else fmt


def _dtype_text(p: PreparedMerge) -> str:
    """`output.dtype`, else the base's floating dtype(s): one name, or each tensor's own."""
    dtypes = {p.output_dtype} if p.output_dtype else {
        i.dtype for i in p.base.tensors.values() if i.is_float}
    names = sorted(str(d).removeprefix("torch.") for d in dtypes)
    return names[0] if len(names) == 1 else f"as in the base, per tensor ({', '.join(names)})"


def _cast_output(p: PreparedMerge, name: str, tensor: torch.Tensor, merged: bool = True
                 ) -> torch.Tensor:
    """`tensor` on the CPU in `name`'s output dtype. A merged value must be finite there: a
    weight, alpha or scale too large overflows to Inf (in the compute dtype, or in a 16-bit
    output), and nothing is written then. Copies of the base are written as they are."""
    dtype = p.dtype_of(name)
    if not tensor.dtype.is_floating_point:
        return tensor.to("cpu")
    out = tensor.to("cpu", dtype)
    # a sum is finite when every entry is; only a non-finite sum pays for the entry-wise check
    # (a sum in another dtype would first copy the whole tensor into it)
    if merged and not bool(torch.isfinite(out.sum())) \
            and not bool(torch.isfinite(out).all()):
        raise NonFiniteResultError(Problem(
            f"the merged value overflows to Inf or NaN in {str(dtype).removeprefix('torch.')} "
            "(a weight, alpha or adapter scale too large?)", tensor=name))
    return out


def _plan(spec: JobSpec, base: Checkpoint, inputs: list[TaskInput]) -> tuple[list[str],
                                                                               list[str]]:
    """Which tensors the method runs on; the others are copied from the base."""
    include = [re.compile(p) for p in spec.options.include]
    exclude = [re.compile(p) for p in spec.options.exclude]
    merged: list[str] = []
    copied: list[str] = []
    for name, info in base.tensors.items():
        selected = (not include or any(r.search(name) for r in include)) \
            and not any(r.search(name) for r in exclude)
        touched = any(task.touches(name) for task in inputs)
        (merged if selected and touched and info.is_float else copied).append(name)
    return merged, copied


def _nothing_to_merge(spec: JobSpec) -> Problem:
    """No tensor both selected and changed by a task model: the output would be the base (and
    a `lora` output an adapter with no module, which PEFT refuses to load)."""
    include, exclude = spec.options.include, spec.options.exclude
    what = "nothing would be merged"
    if include:
        also = " (with options.exclude)" if exclude else ""
        return Problem(f"selects no tensor that a task model changes{also}: {what}",
                       field="options.include")
    if exclude:
        return Problem(f"excludes every tensor that a task model changes: {what}",
                       field="options.exclude")
    return Problem(f"the task models change no floating-point tensor of the base: {what}",
                   field="models")


def _pinned_spec(spec: JobSpec, resolved: list[ResolvedSource], method: MergeMethod,
                 target_rank: int | None, space: str) -> JobSpec:
    """The spec as run: sources pinned (Hub ids to their commit, local paths absolute), task
    names, the space `auto` chose and every method parameter written out, defaults included
    (a later version with other defaults reruns it the same)."""
    models = [m.model_copy(update={"source": r.pinned, "name": n})
              for m, r, n in zip(spec.models, resolved[1:], spec.task_names(), strict=True)]
    params = _method_params(method, target_rank)
    return spec.model_copy(update={
        "base": resolved[0].pinned, "models": models, "space": space,
        "method": spec.method.model_copy(update={"params": params})})


def _method_params(method: MergeMethod, target_rank: int | None) -> dict[str, Any]:
    """Every method parameter as run, defaults included, and `target_rank` when the `lora`
    output was truncated: what the spec, the report and the model card state."""
    return method.params.model_dump(mode="json") | (
        {"target_rank": target_rank} if target_rank is not None else {})


def _peak_memory(device: torch.device) -> dict[str, int]:
    peak = {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def _report(p: PreparedMerge, tensors: dict[str, dict[str, Any]], timings: dict[str, float],
            out: _Outputs) -> dict[str, Any]:
    out_bytes = out.total_bytes
    artifact = out.artifact
    report: dict[str, Any] = {
        "merge_service_version": __version__,
        "method": {"name": p.method.name, "params": _method_params(p.method, p.target_rank)},
        "space": p.space,
        "base": {"source": p.resolved_spec.base, "revision": p.base_source.revision},
        "models": [{"name": t.name, "source": t.source.pinned, "revision": t.source.revision,
                    "weight": t.weight, "kind": "lora" if t.is_lora else "full"}
                   for t in p.inputs],
        "device": str(p.device),
        "compute_dtype": str(p.compute_dtype).removeprefix("torch."),
        "output": {"format": p.spec.output.format,
                   "dtype": _dtype_text(p), "bytes": out_bytes},
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
        # the whole output (served model and artifact files) against keeping every task model
        # whole, in the output dtype; and against the inputs as given (LoRA: the T adapters)
        whole = len(p.inputs) * sum(i.numel * p.dtype_of(n).itemsize
                                    for n, i in p.base.tensors.items())
        given = sum(i.nbytes for t in p.inputs for i in t.model.tensors.values()
                    if i.is_float)
        report["output"]["size_ratio"] = round(out_bytes / whole, 6) if whole else 0
        report["output"]["size_ratio_to_inputs"] = round(out_bytes / given, 6) if given else 0
        report["output"]["bytes_by_file"] = {
            **({"model": out.model.total_bytes} if out.model else {}),
            **({"adapter_model": out.adapter.total_bytes} if out.adapter else {}),
            **artifact.bytes_by_file()}
    extra = p.method.summarize(tensors, [t.name for t in p.inputs])
    clash = extra.keys() & report.keys()
    if clash:
        raise MergeRuntimeError(f"method {p.method.name} reports keys the engine writes: "
                                f"{sorted(clash)}")
    report.update(extra)
    return report


def _base_model_name(p: PreparedMerge) -> str:
    """The base as a `lora` output's adapter_config.json names it (PEFT loads it from there):
    repo id, or local path."""
    return p.base_source.repo_id or str(p.base_source.path)


def _model_card(p: PreparedMerge) -> str:
    served = _served_format(p)
    return render_model_card(
        title=p.spec.name or f"{p.method.name} merge",
        base_model=hub_model_id(p.base_source.repo_id, p.base_source.path,
                                [t.model.base_model_name for t in p.inputs
                                 if isinstance(t.model, LoraAdapter)]),
        base=p.resolved_spec.base,
        relation="adapter" if served == "lora" else "merge",
        library={"lora": "peft", "full": "transformers"}.get(served or ""),
        method=p.method.name,
        params=_method_params(p.method, p.target_rank),
        inputs=[{"name": t.name, "source": t.source.pinned, "weight": t.weight}
                for t in p.inputs],
        output_format=p.spec.output.format,
        notes=_artifact_notes(p),
    )


def _artifact_notes(p: PreparedMerge) -> str:
    """How to use an artifact directory: what it serves and how a task comes back."""
    fmt = p.spec.output.format
    if fmt not in ARTIFACT_FORMATS:
        return ""
    served = _served_format(p)
    serves = {"full": "The directory loads as a model (`transformers`): it serves θ0 + alpha·μ, "
                      "the scaled mean of the task vectors. ",
              "lora": "The directory loads as a PEFT adapter of the base: it serves "
                      "θ0 + alpha·μ, the scaled mean of the task vectors. "}.get(served or "", "")
    tasks = ", ".join(f"`{t.name}`" for t in p.inputs)
    return (f"## Recovering a task\n\nThis is a `{fmt}` artifact. {serves}Any task model "
            f"({tasks}) is rebuilt from it and the base with\n\n"
            "```\nmerge-service revert THIS_DIRECTORY --task NAME --out DIR\n```")
