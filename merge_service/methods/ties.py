"""`ties` (METHODS.md section 3): trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from __future__ import annotations

import torch
from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import MergeMethod, MethodParams, TensorResult, TensorTask
from merge_service.methods.linalg import disjoint_mean, magnitude_trim, sign_election


class TiesParams(MethodParams):
    density: float = Field(
        0.2, gt=0, le=1,
        description="fraction of each task vector's entries kept, by magnitude "
                    "(k = floor(density · numel))",
    )
    alpha: float = Field(1.0, description="scale of the merged task vector")


def sign_conflict_fraction(xs: list[torch.Tensor], gamma: torch.Tensor) -> torch.Tensor:
    """Share of the kept (non-zero) entries whose sign was elected against (a 0-d tensor)."""
    kept = torch.zeros((), dtype=torch.int64, device=gamma.device)
    against = torch.zeros((), dtype=torch.int64, device=gamma.device)
    for x in xs:
        nonzero = x != 0
        kept += nonzero.sum()
        against += (nonzero & (torch.sign(x) != gamma)).sum()
    return against / kept.clamp_min(1)


@register
class Ties(MergeMethod):
    name = "ties"
    summary = "Trim each τ_t to its top-density magnitudes, elect signs by mass, disjoint mean."
    Params = TiesParams

    def merge(self, task: TensorTask) -> TensorResult:
        p: TiesParams = self.params  # type: ignore[assignment]
        # X_t = w_t · trim(τ_t); every tensor, matrix or not
        xs = []
        for tv, w in zip(task.task_vectors, task.weights, strict=True):
            trimmed = magnitude_trim(tv, p.density, inplace=True)
            xs.append(trimmed if w == 1.0 else trimmed.mul_(w))
        gamma = sign_election(xs)
        task.diagnostics["sign_conflict"] = float(sign_conflict_fraction(xs, gamma).item())
        return TensorResult(p.alpha * disjoint_mean(xs, gamma))
