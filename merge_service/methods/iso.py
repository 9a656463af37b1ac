"""`iso_c` and `iso_cts` (METHODS.md sections 7, 8): isotropic merging (Marczak et al., 2025).

Both flatten the singular spectrum of the merged task matrix to one value, its mean.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import MergeMethod, SvdParams, TensorResult, TensorTask
from merge_service.methods.linalg import (
    fraction_floor,
    numerical_rank,
    polar,
    svd,
    weighted_sum,
    weighted_sum_,
)


class IsotropicParams(SvdParams):
    alpha: float = Field(1.0, description="scale of the merged task vector")


class IsoCParams(IsotropicParams):
    """`iso_c` has no parameter of its own."""


class IsoCtsParams(IsotropicParams):
    common_fraction: float = Field(
        0.8, ge=0, le=1,
        description="share of the r = min(m, n) directions taken from the common subspace",
    )


IsoP = TypeVar("IsoP", bound=IsotropicParams)


class _Isotropic(MergeMethod[IsoP]):
    def non_matrix(self, task: TensorTask) -> TensorResult:
        """`Δ = alpha · (1/T) Σ_t w_t τ_t`."""
        alpha = self.params.alpha
        return TensorResult(weighted_sum_(task.task_vectors, task.weights)
                            .mul_(alpha / task.num_tasks))


@register
class IsoC(_Isotropic[IsoCParams]):
    name = "iso_c"
    summary = "Sum the task vectors, then set every singular value on its rank to their mean."
    Params = IsoCParams

    def merge(self, task: TensorTask) -> TensorResult:
        p = self.params
        if not self.is_matrix(task):
            return self.non_matrix(task)
        total = weighted_sum(task.task_vectors, task.weights)  # S = Σ_t w_t τ_t, m × n
        u, sigma, v = svd(total)
        # restricted to the numerical rank: the reference also spreads σ̄ over null-space
        # directions of low-rank sums, which are arbitrary
        rank = numerical_rank(sigma)
        task.diagnostics["rank"] = rank
        if rank == 0:
            return TensorResult(torch.zeros_like(total))
        sigma_mean = sigma[:rank].mean()  # σ̄
        # Δ = alpha · σ̄ · U[:, :ρ] V[:, :ρ]ᵀ
        return TensorResult((u[:, :rank] * (p.alpha * sigma_mean)) @ v[:, :rank].mT)


def iso_cts_split(r: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """`(k', s)`: the common rank and the per-task rank, with `k' + s·T = r`.

    `k = floor(common_fraction · r)`, `s = round((r − k) / T)` (half to even), `k' = r − s·T`,
    as the reference code does. Rounding up can ask for more task directions than there are
    (`s·T > r`, e.g. r = 3, T = 2, common_fraction = 0 gives s = 2): then s is lowered to
    `r // T`, leaving `k' = r mod T` common directions, so that `k' ≥ 0` and the stack still
    has r columns.
    """
    k = fraction_floor(common_fraction, r)
    s = round((r - k) / num_tasks)
    if s * num_tasks > r:
        s = r // num_tasks
    return r - s * num_tasks, s


@register
class IsoCts(_Isotropic[IsoCtsParams]):
    name = "iso_cts"
    summary = "Common subspace of the sum plus each task's own top directions, isotropic spectrum."
    Params = IsoCtsParams

    def merge(self, task: TensorTask) -> TensorResult:
        p = self.params
        if not self.is_matrix(task):
            return self.non_matrix(task)
        xs = task.weighted()  # X_t = w_t τ_t, each m × n
        m, n = xs[0].shape
        common, per_task = iso_cts_split(min(m, n), task.num_tasks, p.common_fraction)
        task.diagnostics["common_rank"] = common
        task.diagnostics["task_rank"] = per_task
        if common + per_task == 0:  # an empty matrix
            return TensorResult(torch.zeros_like(xs[0]))

        # common part: top-k' of SVD(Σ X_t); k' = 0 leaves it empty and X_t⊥ = X_t
        u, sigma, v = svd(weighted_sum(xs, [1.0] * len(xs)))
        u_common = u[:, :common]  # m × k'
        us, sigmas, vs = [u_common], [sigma[:common]], [v[:, :common]]
        # task-specific parts (none when s = 0: the common part then spans all r directions)
        if per_task > 0:
            for x in xs:
                x_perp = x - u_common @ (u_common.mT @ x)  # X_t − U_k' U_k'ᵀ X_t
                u_t, sigma_t, v_t = svd(x_perp)
                us.append(u_t[:, :per_task])
                sigmas.append(sigma_t[:per_task])
                vs.append(v_t[:, :per_task])
        u_stack = torch.cat(us, dim=1)  # m × r
        v_stack = torch.cat(vs, dim=1)  # n × r
        sigma_mean = torch.cat(sigmas).mean()  # σ̄ over all stacked values
        # Δ = alpha · σ̄ · polar(U_stack) polar(V_stack)ᵀ
        return TensorResult((polar(u_stack) * (p.alpha * sigma_mean)) @ polar(v_stack).mT)
