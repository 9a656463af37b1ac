"""`ties` (METHODS.md section 3): trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from __future__ import annotations

from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import MergeMethod, MethodParams, TensorResult, TensorTask
from merge_service.methods.linalg import elected_disjoint_mean_, magnitude_trim


class TiesParams(MethodParams):
    density: float = Field(
        0.2, gt=0, le=1,
        description="fraction of each task vector's entries kept, by magnitude "
                    "(k = floor(density · numel))",
    )
    alpha: float = Field(1.0, description="scale of the merged task vector")


@register
class Ties(MergeMethod[TiesParams]):
    name = "ties"
    summary = "Trim each τ_t to its top-density magnitudes, elect signs by mass, disjoint mean."
    Params = TiesParams

    def merge(self, task: TensorTask) -> TensorResult:
        p = self.params
        # X_t = w_t · trim(τ_t); every tensor, matrix or not
        xs = []
        for tv, w in zip(task.task_vectors, task.weights, strict=True):
            trimmed = magnitude_trim(tv, p.density, inplace=True)
            xs.append(trimmed if w == 1.0 else trimmed.mul_(w))
        merged, conflict = elected_disjoint_mean_(xs)
        task.diagnostics["sign_conflict"] = float(conflict)
        return TensorResult(merged.mul_(p.alpha))
