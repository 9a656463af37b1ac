"""`compressed` and `reversible` artifacts: their tensor files, their `tasks.json`, and how one
task's delta is rebuilt from them.

Every stored tensor is named `"{tensor}::{task_index}::{part}"`, with `task_index` = `shared`
for a part that every task's reconstruction uses. The method decides which file each part goes
to (`MergeMethod.artifact_files`; default: one file named for the format, e.g.
`compressed.safetensors`; `rmm`: `basis.safetensors` and `coefficients.safetensors`). Files are
written by `ShardedSafetensorsWriter`, so a large one is sharded with an index like a model.
An artifact written from LoRA core space also stores each module's `u_b` and `v_a` (shared):
the method's parts are then core matrices and the delta is `U_B · core · V_Aᵀ`.
`tasks.json` records the format, the method, the task names in order, the base and the files.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_service.errors import CorruptTensorError, InvalidInputError, Problem, capped
from merge_service.methods import MergeMethod, get_method_class
from merge_service.sinks.report import write_json
from merge_service.sinks.safetensors_writer import ShardedSafetensorsWriter
from merge_service.sources.checkpoint import Checkpoint, TensorInfo
from merge_service.spaces import CoreSpace

ARTIFACT_FORMATS = frozenset({"compressed", "reversible"})
MANIFEST = "tasks.json"
SHARED = "shared"
CORE_PARTS = ("u_b", "v_a")  # stored with an artifact written from LoRA core space


class ArtifactWriter:
    """Routes artifact tensors to their files as they are produced, one tensor in memory."""

    def __init__(self, directory: Path, fmt: str, files: Mapping[str, str],
                 shard_bytes: int) -> None:
        self.directory = directory
        self.fmt = fmt
        self.files = dict(files)
        self.shard_bytes = shard_bytes
        # every declared file exists even when no tensor goes to it (revert opens them all)
        self._writers = {prefix: ShardedSafetensorsWriter(directory, prefix, shard_bytes)
                         for prefix in sorted(set(self.files.values()) or {fmt})}

    def add(self, tensor_name: str, key: str, value: torch.Tensor) -> None:
        """`key` = `"{task_index}::{part}"` as in `TensorResult.artifact`."""
        prefix = self.files.get(key.rsplit("::", 1)[-1], self.fmt)
        writer = self._writers.get(prefix)
        if writer is None:
            writer = self._writers[prefix] = ShardedSafetensorsWriter(
                self.directory, prefix, self.shard_bytes)
        writer.add(f"{tensor_name}::{key}", value)

    @property
    def total_bytes(self) -> int:
        return sum(w.total_bytes for w in self._writers.values())

    def bytes_by_file(self) -> dict[str, int]:
        return {prefix: w.total_bytes for prefix, w in self._writers.items()}

    def finish(self, manifest: dict[str, Any]) -> list[str]:
        """Write the tensor files and `tasks.json` (with `files` added); return the names."""
        names = []
        for writer in self._writers.values():
            names += writer.finish()
        write_json(self.directory / MANIFEST, {**manifest, "format": self.fmt,
                                               "files": sorted(self._writers)})
        return [*names, MANIFEST]


@dataclass
class Artifact:
    """An artifact directory opened for reading: its manifest and its tensor files' headers."""

    directory: Path
    fmt: str
    method: type[MergeMethod]
    tasks: list[str]
    manifest: dict[str, Any]
    files: list[Checkpoint]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    _owner: dict[str, Checkpoint] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: Path) -> Artifact:
        """Read `tasks.json` and every file's header; raise `InvalidInputError` with every
        problem found (not an artifact, unknown method, missing or corrupt files, tensors no
        task's revert would use)."""
        not_artifact = InvalidInputError(Problem(
            f"{directory} is not a compressed or reversible artifact (no valid {MANIFEST})",
            model="artifact"))
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            raise not_artifact from None
        if not isinstance(manifest, dict):
            raise not_artifact
        tasks, fmt = manifest.get("tasks"), manifest.get("format")
        files = manifest.get("files", [fmt])  # written before `files` was recorded: one file
        if (fmt not in ARTIFACT_FORMATS or not isinstance(tasks, list) or not tasks
                or not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(tasks)
                or not isinstance(files, list) or not files
                or not all(isinstance(f, str) and f and "/" not in f for f in files)):
            raise not_artifact
        method = get_method_class(str(manifest.get("method", "")))
        if method is None or fmt not in method.output_formats:
            raise InvalidInputError(Problem(
                f"{directory}: {MANIFEST} names method {manifest.get('method')!r}, which does "
                f"not write {fmt!r} artifacts", model="artifact"))
        opened, problems = [], []
        for prefix in files:
            checkpoint, file_problems = Checkpoint.open(directory, "artifact", prefix=prefix)
            problems += file_problems
            if checkpoint is not None:
                opened.append(checkpoint)
        artifact = cls(directory, fmt, method, tasks, manifest, opened)
        indexes = {SHARED, *map(str, range(len(tasks)))}
        misnamed = []
        for checkpoint in opened:
            for key, info in checkpoint.tensors.items():
                if key.count("::") < 2:
                    misnamed.append(Problem(f"tensor {key!r} is not named "
                                            "'tensor::task::part'", model="artifact"))
                elif key.rsplit("::", 2)[1] not in indexes:
                    # a part no task's revert would use: a damaged or foreign artifact
                    misnamed.append(Problem(
                        f"tensor {key!r} has task index {key.rsplit('::', 2)[1]!r} (expected "
                        f"0 to {len(tasks) - 1} for the tasks {', '.join(tasks)}, or {SHARED})",
                        model="artifact"))
                artifact.tensors[key] = info
                artifact._owner[key] = checkpoint
        problems += capped(misnamed, "artifact")
        if problems:
            artifact.close()
            raise InvalidInputError(problems)
        return artifact

    def parts(self, task: str) -> dict[str, dict[str, str]]:
        """For each tensor the artifact covers: `{part: stored key}` of `task` and shared."""
        index = str(self.tasks.index(task))
        found: dict[str, dict[str, str]] = defaultdict(dict)
        for key in self.tensors:
            tensor, task_index, part = key.rsplit("::", 2)
            if task_index in (index, SHARED):
                found[tensor][part] = key
        return dict(found)

    def get(self, key: str) -> torch.Tensor:
        return self._owner[key].get(key)

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype most stored floating-point elements have (None: nothing stored)."""
        counts: dict[torch.dtype, int] = defaultdict(int)
        for info in self.tensors.values():
            if info.is_float:
                counts[info.dtype] += info.numel
        return max(counts, key=counts.__getitem__) if counts else None

    def part_problems(self, tensor: str, keys: Mapping[str, str], shape: tuple[int, ...]
                      ) -> list[Problem]:
        """What is wrong with one task's parts of `tensor`, from the headers alone: a part
        that is not floating point (its values would be truncated, or the weight written as
        integers), parts the method does not take or that do not fit together, a delta of
        another shape than the base tensor's `shape`. Checked before anything is written."""
        infos = {part: self.tensors[key] for part, key in sorted(keys.items())}
        problems = [Problem(f"part {part} is stored as {info.dtype}, expected a floating-point "
                            "dtype", model="artifact", tensor=tensor)
                    for part, info in infos.items() if not info.is_float]
        try:  # the reconstruction on meta tensors: shapes only, nothing read or computed
            delta = self._rebuild(tensor, {part: torch.empty(info.shape, device="meta")
                                           for part, info in infos.items()})
        except InvalidInputError as exc:
            return problems + exc.problems
        if delta.shape != shape:
            listing = ", ".join(f"{part} {list(info.shape)}" for part, info in infos.items())
            problems.append(Problem(f"the recovered delta has shape {list(delta.shape)} (from "
                                    f"{listing}), the base tensor {list(shape)}",
                                    model="artifact", tensor=tensor))
        return problems

    def task_delta(self, tensor: str, keys: Mapping[str, str], dtype: torch.dtype
                   ) -> torch.Tensor:
        """One task's delta of `tensor` in `dtype`, from parts `part_problems` passed."""
        delta = self._rebuild(tensor, {part: self.get(key).to(dtype)
                                       for part, key in keys.items()})
        if not bool(torch.isfinite(delta).all()):
            raise CorruptTensorError(Problem("the recovered delta holds NaN or Inf values",
                                             model="artifact", tensor=tensor))
        return delta

    def _rebuild(self, tensor: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The method's reconstruction from `parts`, mapped back from core space when
        `u_b`/`v_a` are stored."""
        core = {part: parts.pop(part) for part in CORE_PARTS if part in parts}
        try:
            delta = self.method.reconstruct(parts)
            if core:
                if len(core) != len(CORE_PARTS):
                    raise InvalidInputError(Problem(
                        f"core-space artifact needs both {' and '.join(CORE_PARTS)}, found "
                        f"only {', '.join(core)}"))
                u_b, v_a = core["u_b"], core["v_a"]
                if delta.dim() != 2 or u_b.dim() != 2 or v_a.dim() != 2 \
                        or (u_b.shape[1], v_a.shape[1]) != tuple(delta.shape):
                    raise InvalidInputError(Problem(
                        f"core-space parts do not fit: u_b {list(u_b.shape)}, core "
                        f"{list(delta.shape)}, v_a {list(v_a.shape)}"))
                delta = CoreSpace(u_b, v_a, []).to_full(delta)
        except InvalidInputError as exc:
            raise InvalidInputError([Problem(p.message, model="artifact", tensor=tensor)
                                     for p in exc.problems]) from None
        return delta

    def close(self) -> None:
        for checkpoint in self.files:
            checkpoint.close()
