"""What a merge method is: typed parameters plus a pure function from task vectors to a delta.

Every method works on one tensor (or one LoRA module) at a time. It receives the task vectors
`τ_t = θ_t − θ0` of that tensor, already on the compute device in the compute dtype, with the
per-model weights `w_t` beside them, and returns the merged delta `Δ` (so `θ = θ0 + Δ`).
Methods whose output is an artifact rather than a merged model (`tsv_compress`) return the
tensors to store instead (`TensorResult.artifact`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_service.methods.linalg import svd, svd_of_product

if TYPE_CHECKING:
    from merge_service.engine import CancelCheck, PreparedMerge, ProgressCallback
    from merge_service.errors import Problem
    from merge_service.inputs import TaskInput
    from merge_service.spec import JobSpec

# METHODS.md section 0: names of 2-D tensors that are never treated as matrices by SVD methods.
DEFAULT_SVD_EXCLUDE: tuple[str, ...] = (
    "embed_tokens", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "wte", "wpe", "lm_head", "embed_out",
)


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown parameters are errors, and so are NaN
    and Infinity (a merge with them writes no usable model)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SvdParams(MethodParams):
    """Parameters shared by the methods that treat 2-D tensors as matrices."""

    svd_exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SVD_EXCLUDE),
        description="regexes (substrings) of 2-D tensor names handled by the non-matrix rule",
    )


@dataclass
class TensorTask:
    """The inputs of one merge step: one tensor (or LoRA module) of every task model."""

    name: str
    # τ_t, same shape, compute dtype, compute device. They belong to the method: it may
    # overwrite them in place (the engine never reads them again), which keeps peak memory at
    # one tensor per model instead of two.
    task_vectors: list[torch.Tensor]
    weights: list[float]  # w_t
    task_names: list[str] = field(default_factory=list)
    seed: int = 0  # options.seed; methods with randomness derive their generators from it
    is_2d: bool = False  # the tensor is 2-D (whether it counts as a matrix is the method's call)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # written to merge_report.json
    # LoRA cores: τ_t = P_t Q_t with P_t (m × r_t), Q_t (r_t × n), None where a task has none;
    # `weighted_svd` then decomposes r_t × r_t matrices instead of m × n ones
    factors: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.task_vectors)

    def weighted(self) -> list[torch.Tensor]:
        """`X_t = w_t τ_t` (a weight of exactly 1 returns the tensor itself, no copy)."""
        return [tv if w == 1.0 else tv * w for tv, w in zip(self.task_vectors, self.weights,
                                                             strict=True)]

    def weighted_svd(self, t: int, x: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The thin SVD of `X_t = x` (`weighted()[t]`), σ descending: from its factors where
        they are thinner than X (the singular values beyond r_t are zero), else of `x`."""
        pair = self.factors[t] if self.factors is not None else None
        if pair is None or pair[0].shape[1] >= min(x.shape):
            return svd(x)
        left, right = pair
        return svd_of_product(left * self.weights[t], right)


@dataclass
class TensorResult:
    """What a method produced for one tensor: a delta, artifact tensors, or both.

    Artifact keys are `"{task_index}::{part}"`, or `"shared::{part}"` for a part every task's
    reconstruction uses (`rmm`'s mean and basis); the engine stores them as
    `"{tensor_name}::{task_index}::{part}"` and hands the parts of one task (its own and the
    shared ones) back to `MergeMethod.reconstruct` on `revert`.
    """

    delta: torch.Tensor | None = None
    artifact: dict[str, torch.Tensor] = field(default_factory=dict)


P = TypeVar("P", bound=MethodParams)


class MergeMethod(ABC, Generic[P]):
    """A merge method. Subclasses set `name`, `Params` (the class of `P`), and implement
    `merge`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # The output formats this method can produce (DESIGN.md section 2); `lora` only from core
    # space, which preflight checks.
    output_formats: ClassVar[frozenset[str]] = frozenset({"full", "lora"})
    # False for methods that produce only an artifact (no merged delta).
    produces_delta: ClassVar[bool] = True
    # The spaces this method runs in on LoRA inputs (METHODS.md section 10).
    spaces: ClassVar[frozenset[str]] = frozenset({"full", "core", "knots"})
    # Artifact methods: the safetensors file (its name without `.safetensors`) each stored part
    # goes to; parts not named here go to the file named for the output format.
    artifact_files: ClassVar[Mapping[str, str]] = MappingProxyType({})
    # False for methods that have no use for the per-model weights w_t (they recover each task
    # model itself): preflight refuses a weight other than 1 for them.
    uses_weights: ClassVar[bool] = True
    # True for methods that apply w_t themselves, as coefficients after a step that mixes the
    # tasks (drm: after the shared decomposition and the sign election). In core and knots
    # space they get the matrices of the unweighted factors, and the weights beside them.
    weights_as_coefficients: ClassVar[bool] = False

    def __init__(self, params: P) -> None:
        self.params = params

    def is_matrix(self, task: TensorTask) -> bool:
        """METHODS.md section 0: 2-D and not svd-excluded (options.exclude never reaches here)."""
        if not task.is_2d:
            return False
        patterns: Sequence[str] = getattr(self.params, "svd_exclude", ())
        return not any(re.search(p, task.name) for p in patterns)

    @abstractmethod
    def merge(self, task: TensorTask) -> TensorResult:
        """Merge one tensor."""

    def summarize(self, tensors: dict[str, dict[str, Any]], task_names: list[str]
                  ) -> dict[str, Any]:
        """Whole-model figures from the per-tensor diagnostics, added to merge_report.json
        under their own top-level keys (none by default)."""
        return {}

    @classmethod
    def reconstruct(cls, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Artifact methods: one task's delta of one tensor from its stored parts."""
        raise NotImplementedError(f"{cls.name} writes no artifact")


class SumOfTerms(MergeMethod[P]):
    """A method whose delta is `finish(Σ_t w_t · term_t)`, each term depending on one task
    only (`task_arithmetic`, `average`, `dare_linear`).

    The engine streams these on full tensors: it reads one task vector at a time and adds its
    term to a running sum, so a merge holds three tensors (base, sum, the task being read)
    instead of T + 1. `merge` is the same arithmetic on task vectors already in memory (LoRA
    spaces, tests); both paths accumulate in the same order, so they agree bit for bit.
    """

    @abstractmethod
    def term(self, task: TensorTask, t: int, task_vector: torch.Tensor) -> torch.Tensor:
        """Task t's term, before its weight; may overwrite `task_vector` (the method's)."""

    def finish(self, task: TensorTask, total: torch.Tensor) -> torch.Tensor:
        """The delta from `Σ_t w_t · term_t` (may work in place)."""
        return total

    @staticmethod
    def accumulate(total: torch.Tensor | None, term: torch.Tensor, weight: float
                   ) -> torch.Tensor:
        if total is None:
            return term if weight == 1.0 else term.mul_(weight)
        return total.add_(term, alpha=weight)

    def merge(self, task: TensorTask) -> TensorResult:
        total = None
        for t, (tv, w) in enumerate(zip(task.task_vectors, task.weights, strict=True)):
            total = self.accumulate(total, self.term(task, t, tv), w)
        assert total is not None  # a merge has at least two tasks
        return TensorResult(self.finish(task, total))


class WholeModelOutcome(Protocol):
    """What a whole-model method learned: each merged tensor and its report entry."""

    report: dict[str, Any]  # merge_report.json, under the method's name

    def tensor(self, name: str) -> torch.Tensor: ...

    def info(self, name: str) -> dict[str, Any]: ...


class WholeModelMethod(MergeMethod[P]):
    """A method that needs the whole model at once (`adarank`): the engine asks it for its own
    preflight problems, then runs `optimize` before writing, instead of `merge` per tensor."""

    @abstractmethod
    def whole_model_problems(self, spec: JobSpec, base_path: Path | None,
                             base_tensors: dict[str, Any] | None, inputs: list[TaskInput]
                             ) -> list[Problem]:
        """Everything `optimize` needs that the per-tensor checks do not cover."""

    @abstractmethod
    def optimize(self, prepared: PreparedMerge, progress: ProgressCallback,
                 cancelled: CancelCheck) -> WholeModelOutcome:
        """Learn the merge; the engine then writes `outcome.tensor(name)` for every tensor."""

    def merge(self, task: TensorTask) -> TensorResult:
        from merge_service.errors import MergeRuntimeError

        raise MergeRuntimeError(f"{self.name} merges the whole model at once: the engine runs "
                                "its optimize, not merge() tensor by tensor")
