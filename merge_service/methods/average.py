"""`average` (METHODS.md section 1): the weighted mean of the task models."""

from __future__ import annotations

import torch

from merge_service.methods import register
from merge_service.methods.base import MethodParams, SumOfTerms, TensorTask


@register
class Average(SumOfTerms[MethodParams]):
    name = "average"
    summary = "Weighted mean of the models: θ = Σ w_t θ_t / Σ w_t."
    spaces = frozenset({"full"})
    output_formats = frozenset({"full"})

    def term(self, task: TensorTask, t: int, task_vector: torch.Tensor) -> torch.Tensor:
        return task_vector

    def finish(self, task: TensorTask, total: torch.Tensor) -> torch.Tensor:
        # θ0 + Σ w τ / Σ w = Σ w θ / Σ w
        return total.div_(sum(task.weights))
