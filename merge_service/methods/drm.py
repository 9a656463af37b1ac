"""`drm` (METHODS.md section 11): Decom-Renorm-Merge (arXiv 2505.23117).

The T task matrices are stacked side by side (`horizontal`) or on top of each other
(`vertical`) and decomposed once, so that every task is written in one shared basis. Each
task's coordinates in that basis are renormalised per component, pruned by magnitude over all
tasks together, sign-elected and averaged disjointly; the average is mapped back through the
shared basis.

LoRA spaces (METHODS.md section 10): in `core` and `knots` space the rule runs on the small
matrices `M_t` (or `R_t`) instead of the `τ_t`. Section 10 has the engine fold `w_t s_t` into
`B_t` and hand the rule `w_t = 1`; that is exact for the methods that weight each task first
(`X_t = w_t τ_t`), but DRM applies `c_t = w_t` only after the shared decomposition and the
sign election, and ignores the weights at `drop_rate: 0`. Folded weights would enter the
decomposition, flip a task's sign vote for a negative weight and weight the rate-0 mean. So
DRM sets `weights_as_coefficients`: its spaces are built from the unweighted factors (`s_t`
folded, not `w_t`) and the rule gets the real `w_t` as `c_t`, in every space the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

import torch
from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import MergeMethod, SvdParams, TensorResult, TensorTask
from merge_service.methods.linalg import disjoint_mean, kth_largest, numerical_rank

Direction = Literal["horizontal", "vertical", "auto"]

COMPONENT_RTOL = 0.01  # R = #{σ_i > 0.01 σ_1}
DIRECTION_RTOL = 0.1  # auto: matrix_rank(·, rtol=0.1) of both stacks


class DrmParams(SvdParams):
    drop_rate: float = Field(
        0.8, ge=0, le=1,
        description="share of the renormalised basis entries pruned by magnitude, over all "
                    "tasks together; 0 = disjoint mean of the task vectors",
    )
    direction: Direction = Field(
        "horizontal",
        description="horizontal: [τ_1 … τ_T], shared left singular vectors; vertical: "
                    "[τ_1; …; τ_T], shared right singular vectors; auto: horizontal where its "
                    "stack has the lower rank (rtol 0.1), else vertical",
    )
    alpha: float = Field(1.0, description="scale of the merged task vector")


def kept_count(num_entries: int, drop_rate: float) -> int:
    """`round(N_all · (1 − drop_rate))`, round half to even, in exact arithmetic on the decimal
    the rate is written as (the float product `N · (1 − 0.7)` is 10.500000000000002 for
    N = 35, which would round up)."""
    return round(num_entries * (1 - Fraction(repr(float(drop_rate)))))


def prune_smallest(magnitudes: torch.Tensor, drop_rate: float) -> tuple[torch.Tensor | None, int]:
    """The mask of the entries pruned from the stacked `N` (given as `|N|`), and `k`.

    `k = N_all − round(N_all · (1 − drop_rate))`; if `k ≥ 1`, every entry with `|x|` below the
    k-th smallest `|x|` is pruned. As the reference: strictly below, so with distinct
    magnitudes `k − 1` entries go (and ties with the k-th smallest all stay). The k-th smallest
    is the `(N_all − k + 1)`-th largest, found by radix select (linear time). Returns
    `(None, k)` when nothing is pruned.
    """
    n = magnitudes.numel()
    k = n - kept_count(n, drop_rate)
    if k < 1:
        return None, k
    threshold = kth_largest(magnitudes, n - k + 1)
    return magnitudes < threshold, k


def elect_signs(total: torch.Tensor) -> torch.Tensor:
    """`γ = sign(Σ_t Y_t)`; where the sum is 0, the sign of the sum of all elected signs of the
    tensor (0 if that is 0 too, as the reference: then only zeros agree with it)."""
    gamma = total.sign()
    fallback = gamma.sum().sign()
    return torch.where(gamma == 0, fallback, gamma)


def shared_basis_merge(coords: torch.Tensor, coefficients: Sequence[float], drop_rate: float,
                       diagnostics: dict[str, Any]) -> torch.Tensor:
    """Renorm, prune, elect, disjoint mean of the task coordinates in the shared basis.

    `coords` (T × R × d) holds `diag(σ) V_tᵀ` for every task t (horizontal; vertical passes the
    transposed blocks `(U_t diag(σ))ᵀ`): row i of task t is `s_{t,i} N_t[i, :]` with
    `s_{t,i} = σ_i ν_{t,i}` its norm. It is overwritten. Returns `Ȳ` (R × d).
    """
    num_tasks = coords.shape[0]
    scale = torch.linalg.vector_norm(coords, dim=2, keepdim=True)  # s_t, T × R × 1
    # N_t = V_tᵀ / ν_t; a zero row stays zero (that task has no part in the component), where
    # the reference divides by zero and spreads NaN over the whole merged matrix
    magnitudes = coords.abs().div_(torch.where(scale > 0, scale, 1))  # |N|
    pruned, k = prune_smallest(magnitudes, drop_rate)
    del magnitudes
    # Y_t = diag(s_t) · prune(N)_t: the coordinates themselves where kept (s · x / s = x)
    if pruned is not None:
        diagnostics["pruned_fraction"] = float(pruned.sum().item()) / pruned.numel()
        coords.masked_fill_(pruned, 0)
        del pruned
    else:
        diagnostics["pruned_fraction"] = 0.0
    diagnostics["pruned_k"] = k
    gamma = elect_signs(coords.sum(dim=0))  # R × d
    against = (coords.sign() != gamma) & (coords != 0)
    kept = int(torch.count_nonzero(coords).item())
    diagnostics["sign_conflict"] = float(against.sum().item()) / max(1, kept)
    coords.masked_fill_(against, 0)
    del against
    # Z_t = c_t Y_t; Ȳ = Σ_t Z_t / max(1, #{t : Z_t ≠ 0})
    c = torch.tensor(list(coefficients), dtype=coords.dtype, device=coords.device)
    coords.mul_(c.view(num_tasks, 1, 1))
    count = torch.count_nonzero(coords, dim=0).clamp_min_(1)
    return coords.sum(dim=0).div_(count)


def components(sigma: torch.Tensor) -> int:
    """`R = #{σ_i > 0.01 σ_1}` (0 for a zero matrix)."""
    return numerical_rank(sigma, COMPONENT_RTOL)


def drm_horizontal(taus: Sequence[torch.Tensor], coefficients: Sequence[float], drop_rate: float,
                   diagnostics: dict[str, Any]) -> torch.Tensor:
    """`X = [τ_1 … τ_T]` (m × T n'), shared `U`; returns `U[:, :R] Ȳ` (without alpha)."""
    u, sigma, vh = torch.linalg.svd(torch.cat(list(taus), dim=1), full_matrices=False)
    del vh  # K × T·n', as large as X: the blocks are taken from U below
    rank = components(sigma)
    diagnostics["rank"] = rank
    if rank == 0:
        return torch.zeros_like(taus[0])
    u = u[:, :rank]  # m × R
    # diag(σ) V_tᵀ = U[:, :R]ᵀ τ_t (X = U Σ Vᵀ): the same block in exact arithmetic, and
    # exactly zero for a zero τ_t, where the SVD's V_tᵀ is rounding noise that the
    # renormalisation would blow up to unit rows
    coords = torch.stack([u.mT @ tau for tau in taus])  # T × R × n'
    return u @ shared_basis_merge(coords, coefficients, drop_rate, diagnostics)


def drm_vertical(taus: Sequence[torch.Tensor], coefficients: Sequence[float], drop_rate: float,
                 diagnostics: dict[str, Any]) -> torch.Tensor:
    """`X = [τ_1; …; τ_T]` (T m × n'), shared `Vᵀ`; returns `Ū Vᵀ[:R]` (without alpha)."""
    u, sigma, vh = torch.linalg.svd(torch.cat(list(taus), dim=0), full_matrices=False)
    del u  # T·m × K, as large as X: the blocks are taken from V below
    rank = components(sigma)
    diagnostics["rank"] = rank
    if rank == 0:
        return torch.zeros_like(taus[0])
    v = vh[:rank].mT  # n' × R
    # U_t diag(σ) = τ_t V[:, :R], for the reason given in drm_horizontal; held transposed
    # (R × m) so that a component's entries lie along the last dimension, as horizontally
    coords = torch.stack([(tau @ v).mT for tau in taus])  # T × R × m
    return shared_basis_merge(coords, coefficients, drop_rate, diagnostics).mT @ v.mT


def stacked_ranks(taus: Sequence[torch.Tensor]) -> tuple[int, int]:
    """`matrix_rank(·, rtol=0.1)` of `[τ_1 … τ_T]` and of `[τ_1; …; τ_T]`."""
    horizontal = torch.linalg.svdvals(torch.cat(list(taus), dim=1))
    vertical = torch.linalg.svdvals(torch.cat(list(taus), dim=0))
    return (numerical_rank(horizontal, DIRECTION_RTOL),
            numerical_rank(vertical, DIRECTION_RTOL))


def non_matrix_merge(taus: Sequence[torch.Tensor], coefficients: Sequence[float],
                     diagnostics: dict[str, Any]) -> torch.Tensor:
    """Sign election (zero rule as for matrices) on the `τ_t`, `Z_t = c_t τ_t`, disjoint mean.

    Task by task, never stacked: an embedding matrix is the largest tensor of a model.
    The `τ_t` are overwritten.
    """
    total = taus[0].clone()
    for tau in taus[1:]:
        total.add_(tau)
    gamma = elect_signs(total)
    del total
    zs, against, kept = [], 0, 0
    for tau, c in zip(taus, coefficients, strict=True):
        conflict = (tau.sign() != gamma) & (tau != 0)
        against += int(conflict.sum().item())
        kept += int(torch.count_nonzero(tau).item())
        tau.masked_fill_(conflict, 0)
        zs.append(tau if c == 1.0 else tau.mul_(c))
    diagnostics["sign_conflict"] = against / max(1, kept)
    return disjoint_mean(zs, None)  # counts the non-zero Z_t


@register
class Drm(MergeMethod[DrmParams]):
    name = "drm"
    summary = ("Decompose the stacked task matrices once, renormalise each task's coordinates, "
               "prune, elect signs, disjoint mean (Decom-Renorm-Merge).")
    Params = DrmParams
    weights_as_coefficients = True  # c_t = w_t after the decomposition, in LoRA spaces too

    def merge(self, task: TensorTask) -> TensorResult:
        p = self.params
        taus = task.task_vectors
        coefficients = task.weights  # c_t = w_t
        if not self.is_matrix(task):
            return TensorResult(non_matrix_merge(taus, coefficients, task.diagnostics)
                                .mul_(p.alpha))
        if p.drop_rate == 0:
            # the disjoint mean of the unweighted τ_t, no sign election, no coefficients, as
            # the reference (which skips the decomposition at rate 0); METHODS.md gives no alpha
            task.diagnostics["direction"] = "none"
            return TensorResult(disjoint_mean(taus, None))
        direction = p.direction
        if direction == "auto":
            horizontal, vertical = stacked_ranks(taus)
            task.diagnostics["stacked_ranks"] = {"horizontal": horizontal, "vertical": vertical}
            direction = "horizontal" if horizontal < vertical else "vertical"
        task.diagnostics["direction"] = direction
        rule = drm_horizontal if direction == "horizontal" else drm_vertical
        return TensorResult(rule(taus, coefficients, p.drop_rate, task.diagnostics)
                            .mul_(p.alpha))
