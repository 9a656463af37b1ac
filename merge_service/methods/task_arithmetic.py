"""`task_arithmetic` (METHODS.md section 2): scaled sum of task vectors."""

from __future__ import annotations

from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import MergeMethod, MethodParams, TensorResult, TensorTask
from merge_service.methods.linalg import weighted_sum_


class TaskArithmeticParams(MethodParams):
    alpha: float = Field(0.3, description="scale of the summed task vectors")


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "Δ = alpha · Σ w_t τ_t (Ilharco et al., 2023)."
    Params = TaskArithmeticParams

    def merge(self, task: TensorTask) -> TensorResult:
        p: TaskArithmeticParams = self.params  # type: ignore[assignment]
        return TensorResult(weighted_sum_(task.task_vectors, task.weights).mul_(p.alpha))
