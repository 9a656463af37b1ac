"""`tsv` (METHODS.md section 5): Task Singular Vectors merge (Gargiulo et al., 2025)."""

from __future__ import annotations

import torch
from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import MergeMethod, SvdParams, TensorResult, TensorTask
from merge_service.methods.linalg import numerical_rank, polar, weighted_sum_

# leading singular values of each task per matrix, kept for the report (fewer for a LoRA core
# decomposed from its factors: its other singular values are zero)
SPECTRUM_LENGTH = 64


class TsvParams(SvdParams):
    alpha: float = Field(1.0, description="scale of the merged task vector")


def singular_interference(
    u_hat: torch.Tensor, sigma_hat: torch.Tensor, v_hat: torch.Tensor
) -> torch.Tensor:
    """`‖(ÛᵀÛ − I) diag(σ̂) (V̂ᵀV̂ − I)‖₁` (sum of |entries|), a 0-d tensor."""
    eye = torch.eye(sigma_hat.numel(), dtype=u_hat.dtype, device=u_hat.device)
    left = u_hat.mT @ u_hat - eye  # K × K
    right = v_hat.mT @ v_hat - eye  # K × K
    return ((left * sigma_hat) @ right).abs().sum()


@register
class Tsv(MergeMethod[TsvParams]):
    name = "tsv"
    summary = "Keep each task's top r/T singular triplets, orthogonalise them jointly (TSV-Merge)."
    Params = TsvParams

    def merge(self, task: TensorTask) -> TensorResult:
        p = self.params
        num_tasks = task.num_tasks
        if not self.is_matrix(task):
            # alpha · (1/T) Σ_t X_t: the mean, as the reference code does
            return TensorResult(weighted_sum_(task.task_vectors, task.weights)
                                .mul_(p.alpha / num_tasks))

        xs = task.weighted()  # X_t = w_t τ_t, each m × n
        m, n = xs[0].shape
        # exact integer division: the reference's int(r · (1/T)) is off by one for some r
        per_task = min(m, n) // num_tasks
        us: list[torch.Tensor] = []
        sigmas: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        kept: list[int] = []
        spectra: list[list[float]] = []
        for t, x in enumerate(xs):
            if per_task == 0:
                kept.append(0)
                spectra.append([])
                continue
            u, s, v = task.weighted_svd(t, x)
            spectra.append([float(f"{value:.6g}") for value in s[:SPECTRUM_LENGTH].tolist()])
            k = min(per_task, numerical_rank(s))  # never inject null-space directions
            us.append(u[:, :k])
            sigmas.append(s[:k])
            vs.append(v[:, :k])
            kept.append(k)
        task.diagnostics["kept_rank"] = kept
        task.diagnostics["singular_values"] = spectra  # per task, descending
        if sum(kept) == 0:
            task.diagnostics["interference"] = 0.0
            return TensorResult(torch.zeros_like(xs[0]))

        u_hat = torch.cat(us, dim=1)  # m × K, K = Σ k_t
        sigma_hat = torch.cat(sigmas)  # K
        v_hat = torch.cat(vs, dim=1)  # n × K
        task.diagnostics["interference"] = float(
            singular_interference(u_hat, sigma_hat, v_hat).item())
        # Δ = alpha · polar(Û) diag(σ̂) polar(V̂)ᵀ
        delta = (polar(u_hat) * (p.alpha * sigma_hat)) @ polar(v_hat).mT
        return TensorResult(delta)
