"""`cart` (METHODS.md section 9): low-rank deviations around the weighted average (Choi et al.)."""

from __future__ import annotations

import torch
from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import MergeMethod, SvdParams, TensorResult, TensorTask
from merge_service.methods.linalg import fraction_floor, truncated, weighted_sum


class CartParams(SvdParams):
    rank_fraction: float = Field(
        0.12, gt=0, le=1,
        description="rank kept of each θ_t − θ̄: k = max(1, floor(rank_fraction · min(m, n)))",
    )
    alpha: float = Field(2.0, description="scale of the summed low-rank deviations")


@register
class Cart(MergeMethod[CartParams]):
    name = "cart"
    summary = "Weighted average plus alpha · Σ w_t SVD_k(θ_t − θ̄) (centered task arithmetic)."
    Params = CartParams

    def merge(self, task: TensorTask) -> TensorResult:
        p = self.params
        # τ̄ = θ̄ − θ0 = Σ w_t τ_t / Σ w_t  (Σ w_t ≠ 0 is checked at preflight)
        mean = weighted_sum(task.task_vectors, task.weights) / sum(task.weights)
        if not self.is_matrix(task):
            return TensorResult(mean)
        m, n = mean.shape
        r = min(m, n)
        k = max(1, fraction_floor(p.rank_fraction, r))
        task.diagnostics["rank"] = k
        if k >= r:
            # SVD_k is the identity and Σ_t w_t (θ_t − θ̄) = 0: θ̄ itself, exactly
            return TensorResult(mean)
        deviations = torch.zeros_like(mean)
        for tv, w in zip(task.task_vectors, task.weights, strict=True):
            deviations.add_(truncated(tv - mean, k), alpha=w)  # θ_t − θ̄ = τ_t − τ̄
        return TensorResult(mean.add_(deviations, alpha=p.alpha))
