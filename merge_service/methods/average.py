"""`average` (METHODS.md section 1): the weighted mean of the task models."""

from __future__ import annotations

from merge_service.methods import register
from merge_service.methods.base import MergeMethod, TensorResult, TensorTask
from merge_service.methods.linalg import weighted_sum


@register
class Average(MergeMethod):
    name = "average"
    summary = "Weighted mean of the models: θ = Σ w_t θ_t / Σ w_t."
    spaces = frozenset({"full"})
    output_formats = frozenset({"full"})

    def merge(self, task: TensorTask) -> TensorResult:
        # θ0 + Σ w τ / Σ w = Σ w θ / Σ w
        total = sum(task.weights)
        return TensorResult(weighted_sum(task.task_vectors, task.weights) / total)
