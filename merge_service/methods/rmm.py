"""`rmm` (METHODS.md section 13): reversible bases, a served mean plus a per-tensor basis from
which every task model is recovered.

Per tensor (or LoRA module, on its core matrices): `μ = (1/T) Σ_t τ_t`, `D_t = τ_t − μ`,
Gram `G_ts = ⟨D_t, D_s⟩_F = Q Λ Qᵀ` (λ descending). Keep `j ≤ p` with `λ_j > 1e-10 λ_1`;
`Φ_j = Σ_t Q_tj D_t / sqrt(λ_j)` (orthonormal), `c_tj = sqrt(λ_j) Q_tj`. The served delta is
`alpha · μ`; `τ̂_t = μ + Σ_j c_tj Φ_j` is the best rank-p affine fit of the task vectors,
`Σ_t ‖τ_t − τ̂_t‖² = Σ_{j>p} λ_j`, exact when `p ≥ T − 1`. Per-model weights play no part:
recovery targets the task models themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import torch
from pydantic import Field

from merge_service.errors import InvalidInputError, Problem
from merge_service.methods import register
from merge_service.methods.base import MergeMethod, MethodParams, TensorResult, TensorTask

# METHODS.md section 13: basis directions with λ_j ≤ 1e-10 λ_1 are numerically zero.
EIGEN_RTOL = 1e-10
# Elements per task and step of the float64 Gram accumulation (8 MB of float64 per task): the
# Gram is exact in float64 without a float64 copy of a whole tensor.
_GRAM_CHUNK = 1 << 20


class RmmParams(MethodParams):
    basis_size: int = Field(2, ge=1, description="p: basis directions kept per tensor "
                                                 "(recovery is exact when p >= T - 1)")
    alpha: float = Field(1.0, description="scale of the served mean: θ0 + alpha · μ")


def gram(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """`K_ts = ⟨X_t, X_s⟩_F` (T × T, float64), accumulated over chunks of the flattened X_t."""
    flat = [x.reshape(-1) for x in xs]
    size = flat[0].numel()
    k = torch.zeros(len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
    for start in range(0, size, _GRAM_CHUNK):
        block = torch.stack([f[start:start + _GRAM_CHUNK] for f in flat]).to(torch.float64)
        k.addmm_(block, block.mT)  # T × c times c × T
    return k


def eigen_basis(g: torch.Tensor, basis_size: int, floor: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`G = Q Λ Qᵀ`, λ descending (negatives from rounding set to 0), and the number `k` of
    kept directions: `j ≤ basis_size` with `λ_j > 1e-10 λ_1` and `λ_j > floor`. Each column
    of Q is signed so that its largest entry is positive, the first of entries equal to 1e-9
    (T = 2 always ties: ±(1, −1)/√2): the same signs on every device and in every space."""
    lam, q = torch.linalg.eigh(g)
    lam, q = lam.flip(0).clamp_min(0), q.flip(1)
    magnitude = q.abs()
    near_top = magnitude >= magnitude.max(dim=0, keepdim=True).values - 1e-9
    first = near_top.to(torch.int8).argmax(dim=0)  # first True per column
    signs = torch.sign(q.gather(0, first[None, :]))[0]
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs)
    top = float(lam[0]) if lam.numel() else 0.0
    kept = int((lam[:basis_size] > max(EIGEN_RTOL * top, floor)).sum()) if top > 0 else 0
    return lam, q, kept


def _sq_norm(x: torch.Tensor) -> float:
    """`‖X‖²_F` accumulated in float64."""
    flat = x.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, flat.numel(), _GRAM_CHUNK):
        total += flat[start:start + _GRAM_CHUNK].to(torch.float64).square().sum()
    return float(total)


@register
class Rmm(MergeMethod[RmmParams]):
    name = "rmm"
    summary = ("Serve the mean task vector and store a per-tensor basis from which revert "
               "recovers every task model (reversible bases).")
    Params = RmmParams
    output_formats = frozenset({"reversible"})
    # METHODS.md section 13: for LoRA inputs everything is computed on the core matrices
    # (`full` forms ΔW_t and stores the m·n form).
    spaces = frozenset({"full", "core"})
    artifact_files = MappingProxyType({
        "mu": "basis", "basis": "basis", "u_b": "basis", "v_a": "basis",
        "coefficients": "coefficients",
    })
    uses_weights = False

    def merge(self, task: TensorTask) -> TensorResult:
        p = self.params
        taus = task.task_vectors  # T tensors of one shape; ours to overwrite
        num_tasks = task.num_tasks
        shape = taus[0].shape

        sq_norms = [_sq_norm(tau) for tau in taus]  # ‖τ_t‖²
        mu = taus[0].clone()
        for tau in taus[1:]:
            mu.add_(tau)
        mu.div_(num_tasks)
        deltas = [tau.sub_(mu) for tau in taus]  # D_t = τ_t − μ, in place
        # G of the D_t as computed, so that the Φ_j built from them are orthonormal.
        # METHODS.md's relative cut assumes exact arithmetic: for equal task vectors the D_t
        # are rounding residue of μ, and so is λ_1. Energy below (T·eps)²·Σ‖τ_t‖² (eps of the
        # compute dtype), more than that residue can hold, is not kept.
        floor = (num_tasks * torch.finfo(mu.dtype).eps) ** 2 * sum(sq_norms)
        lam, q, kept = eigen_basis(gram(deltas), p.basis_size, floor)

        roots = lam[:kept].sqrt()  # sqrt(λ_j)
        weights = (q[:, :kept] / roots).tolist()  # Q_tj / sqrt(λ_j), T × k
        coefficients = (q[:, :kept] * roots).contiguous()  # c_tj = sqrt(λ_j) Q_tj, T × k
        basis = torch.zeros((kept, *shape), dtype=mu.dtype, device=mu.device)  # Φ_j
        for j in range(kept):
            for t, d in enumerate(deltas):
                basis[j].add_(d, alpha=weights[t][j])

        # the residual D_t − Σ_j c_tj Φ_j = τ_t − τ̂_t, in place of D_t
        c_rows = coefficients.tolist()
        for t, d in enumerate(deltas):
            for j in range(kept):
                d.sub_(basis[j], alpha=c_rows[t][j])
        sq_errors = [_sq_norm(d) for d in deltas]

        artifact = {"shared::mu": mu, "shared::basis": basis}
        c_stored = coefficients.to(mu.dtype)
        for t in range(num_tasks):
            artifact[f"{t}::coefficients"] = c_stored[t].contiguous()
        eigenvalues = lam.tolist()
        task.diagnostics.update({
            "eigenvalues": eigenvalues,
            "kept": kept,
            "dropped_eigenvalue_sum": sum(eigenvalues[kept:]),
            "task_sq_norm": sq_norms,
            "task_sq_error": sq_errors,
            "stored_numel": (1 + kept) * mu.numel() + num_tasks * kept,
        })
        delta = mu if p.alpha == 1.0 else mu * p.alpha
        return TensorResult(delta=delta, artifact=artifact)

    def summarize(self, tensors: dict[str, dict[str, Any]], task_names: list[str]
                  ) -> dict[str, Any]:
        """Each task's relative recovery error `‖τ_t − τ̂_t‖ / ‖τ_t‖` over every tensor the
        artifact covers, from the per-tensor squared norms."""
        sq_norm = [0.0] * len(task_names)
        sq_error = [0.0] * len(task_names)
        dropped = 0.0
        kept: dict[int, int] = {}
        for info in tensors.values():
            if "task_sq_norm" not in info:
                continue
            for t in range(len(task_names)):
                sq_norm[t] += info["task_sq_norm"][t]
                sq_error[t] += info["task_sq_error"][t]
            dropped += info["dropped_eigenvalue_sum"]
            kept[info["kept"]] = kept.get(info["kept"], 0) + 1
        relative = {
            name: math.sqrt(err / norm) if norm > 0 else 0.0
            for name, err, norm in zip(task_names, sq_error, sq_norm, strict=True)
        }
        p = self.params
        return {"recovery": {
            "basis_size": p.basis_size,
            "relative_error": relative,
            "squared_error": dict(zip(task_names, sq_error, strict=True)),
            "task_sq_norm": dict(zip(task_names, sq_norm, strict=True)),
            "dropped_eigenvalue_sum": dropped,
            "tensors_by_kept_directions": {str(k): n for k, n in sorted(kept.items())},
            "covers": "every merged tensor; tensors left out by options.include/exclude "
                      "revert to the base",
        }}

    @classmethod
    def reconstruct(cls, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """`τ̂_t = μ + Σ_j c_tj Φ_j` from the parts `mu`, `basis` (k × shape) and this task's
        `coefficients` (k). Any other part is refused."""
        found = f"found {', '.join(sorted(parts)) or 'none'}; expected mu, basis, coefficients"
        unexpected = sorted(parts.keys() - {"mu", "basis", "coefficients"})
        if unexpected:
            raise InvalidInputError(Problem(
                f"reversible artifact has unexpected part(s) {', '.join(unexpected)} ({found})"))
        missing = [key for key in ("mu", "basis", "coefficients") if key not in parts]
        if missing:
            raise InvalidInputError(Problem(
                f"reversible artifact is missing part(s) {', '.join(missing)} ({found})"))
        mu, basis, coefficients = parts["mu"], parts["basis"], parts["coefficients"]
        if coefficients.dim() != 1 or basis.shape != (coefficients.numel(), *mu.shape):
            raise InvalidInputError(Problem(
                f"reversible artifact parts do not fit together: mu {list(mu.shape)}, basis "
                f"{list(basis.shape)}, coefficients {list(coefficients.shape)} (expected basis "
                f"[k, {', '.join(str(d) for d in mu.shape)}] and coefficients [k])"))
        return mu + torch.tensordot(coefficients.to(basis.dtype), basis, dims=1)
