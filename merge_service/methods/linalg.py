"""The operations METHODS.md section 0 defines once and every method shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch

RANK_RTOL = 1e-5  # rank(X) = #{σ_i > 1e-5 σ_1}


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `X = U diag(σ) Vᵀ`, σ descending. Returns (U, σ, V) with V (not Vᵀ)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u, s, vh.mT


def numerical_rank(sigma: torch.Tensor, rtol: float = RANK_RTOL) -> int:
    """Number of singular values above `rtol · σ_1` (σ sorted descending)."""
    if sigma.numel() == 0:
        return 0
    top = sigma[0]
    if top <= 0:
        return 0
    return int((sigma > rtol * top).sum())


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor `P Qᵀ` of `X = P D Qᵀ`."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def truncated(x: torch.Tensor, k: int) -> torch.Tensor:
    """`SVD_k(X)`: the best rank-k approximation."""
    u, s, v = svd(x)
    return (u[:, :k] * s[:k]) @ v[:, :k].mT


def weighted_sum(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(xs[0])
    for x, w in zip(xs, weights, strict=True):
        out.add_(x, alpha=w)
    return out


def sign_election(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """`γ = sign(Σ_t X_t)` entrywise, +1 where the sum is 0."""
    total = torch.stack(list(xs)).sum(0) if len(xs) > 1 else xs[0].clone()
    gamma = torch.sign(total)
    gamma[gamma == 0] = 1
    return gamma


def disjoint_mean(xs: Sequence[torch.Tensor], gamma: torch.Tensor | None) -> torch.Tensor:
    """`Σ_t a_t X_t / max(1, Σ_t a_t)` with `a_t = [X_t ≠ 0 and sign(X_t) = γ]`.

    `gamma=None` keeps every non-zero entry (no sign election).
    """
    total = torch.zeros_like(xs[0])
    count = torch.zeros_like(xs[0])
    for x in xs:
        agree = x != 0
        if gamma is not None:
            agree &= torch.sign(x) == gamma
        total.add_(torch.where(agree, x, 0))
        count.add_(agree.to(count.dtype))
    return total / count.clamp_min(1)


def magnitude_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `floor(density · numel)` entries of largest |x| (ties: lower index first).

    Selection by threshold (k-th largest magnitude) instead of `torch.topk`: linear time and
    memory on embedding-sized tensors, and the tie rule is explicit rather than left to the
    sort implementation.
    """
    n = x.numel()
    k = int(density * n)
    if k >= n:
        return x.clone()
    if k <= 0:
        return torch.zeros_like(x)
    mag = x.reshape(-1).abs()
    threshold = torch.kthvalue(mag, n - k + 1).values
    keep = mag > threshold
    need = k - int(keep.sum())
    if need > 0:
        at = mag == threshold
        keep |= at & (torch.cumsum(at, 0) <= need)
    return torch.where(keep.reshape(x.shape), x, 0)
