"""`task_arithmetic` (METHODS.md section 2): scaled sum of task vectors."""

from __future__ import annotations

import torch
from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import MethodParams, SumOfTerms, TensorTask


class TaskArithmeticParams(MethodParams):
    alpha: float = Field(0.3, description="scale of the summed task vectors")


@register
class TaskArithmetic(SumOfTerms[TaskArithmeticParams]):
    name = "task_arithmetic"
    summary = "Δ = alpha · Σ w_t τ_t (Ilharco et al., 2023)."
    Params = TaskArithmeticParams

    def term(self, task: TensorTask, t: int, task_vector: torch.Tensor) -> torch.Tensor:
        return task_vector

    def finish(self, task: TensorTask, total: torch.Tensor) -> torch.Tensor:
        p = self.params
        return total.mul_(p.alpha)
