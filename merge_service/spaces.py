"""LoRA spaces (METHODS.md section 10): where a method's rule runs on LoRA inputs.

A space turns the T adapters' factors of one module into T small "task vectors" for the
method, and the method's merged result back into a weight update. `full` needs nothing here
(each `ΔW_t` is formed and the method runs as on full checkpoints).

Every function takes `factors[t] = (A_t, B_t)` with `ΔW_t = B_t @ A_t` in the base tensor's
stored orientation and `w_t s_t` already folded into `B_t`, or `None` for a task whose
adapter does not adapt this module (a zero task: it still counts in T).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from merge_service.methods.linalg import numerical_rank, svd

Factors = tuple[torch.Tensor, torch.Tensor]  # (A: r × n, B: m × r)


@dataclass
class CoreSpace:
    """`ΔW_t = U_B M_t V_Aᵀ`: orthonormal `U_B` (m × p), `V_A` (n × q), cores `M_t` (p × q);
    `factors[t] = (U_Bᵀ B_t, A_t V_A)`, whose product is `M_t` (None for a task without the
    module), for the rules that decompose each core (`TensorTask.factors`)."""

    u_b: torch.Tensor
    v_a: torch.Tensor
    cores: list[torch.Tensor]
    factors: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)

    def to_full(self, merged_core: torch.Tensor) -> torch.Tensor:
        """`ΔW = U_B M̄ V_Aᵀ` (m × n)."""
        return (self.u_b @ merged_core) @ self.v_a.mT

    def to_lora(self, merged_core: torch.Tensor, target_rank: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A', B')` with `ΔW = B' A'`: `B' = U_B M̄`, `A' = V_Aᵀ`; with `target_rank`, the
        top singular triplets of `M̄ = P S Qᵀ`: `B' = U_B P S`, `A' = Qᵀ V_Aᵀ`, of rank
        `min(target_rank, p, q)`. Where that is q, the untruncated pair already has rank q and
        is returned as it is; a `target_rank` of at least p loses nothing (M̄ has rank ≤ p)."""
        rows, cols = merged_core.shape
        if target_rank is None or cols <= min(target_rank, rows):
            return self.v_a.mT.contiguous(), self.u_b @ merged_core
        p, s, q = svd(merged_core)
        k = min(target_rank, s.shape[0])
        return (self.v_a @ q[:, :k]).mT.contiguous(), self.u_b @ (p[:, :k] * s[:k])


def core_space(factors: Sequence[Factors | None]) -> CoreSpace:
    """`A_stack = [A_1; …; A_T]`, `B_stack = [B_1 … B_T]`; `V_A`, `U_B` = all their singular
    vectors (thin SVD, no truncation); `M_t = U_Bᵀ B_t A_t V_A`. Costs grow with Σr, never with
    m·n: no `ΔW_t` is formed.

    Each core is computed as written, `(U_Bᵀ B_t)(A_t V_A)` (two products of size
    (m + n)·r_t·Σr), so that its error is relative to its own task: a task whose update is zero
    (`B_t = 0`, or a weight of 0 folded into it) has an exactly zero core, and a task far
    smaller than the others keeps its own digits. Taking `U_Bᵀ B_t` from the SVD itself (task
    t's columns of `S_B W_Bᵀ`) would be about 1.5% faster on the LoRA bench, but carries an
    error relative to the largest task: rounding noise for a zero task, which the rules that
    count or elect non-zero entries (ties, dare_ties, drm) or take singular vectors (tsv,
    iso_cts) treat as a task, and 26% (float32) for one 10⁷ times smaller, which drm's
    renormalisation would blow up.
    """
    present = [f for f in factors if f is not None]
    _, _, v_a = svd(torch.cat([a for a, _ in present], dim=0))  # Σr × n; V_A: n × q
    u_b, _, _ = svd(torch.cat([b for _, b in present], dim=1))  # m × Σr; U_B: m × p
    projected = [None if f is None else (u_b.mT @ f[1], f[0] @ v_a) for f in factors]
    cores = [u_b.new_zeros(u_b.shape[1], v_a.shape[1]) if pq is None else pq[0] @ pq[1]
             for pq in projected]
    return CoreSpace(u_b, v_a, cores, projected)


@dataclass
class KnotsSpace:
    """`[ΔW_1 … ΔW_T] = U [R_1 … R_T]`: shared `U` (m × ρ), per-task `R_t = diag(σ) V_tᵀ`."""

    u: torch.Tensor
    blocks: list[torch.Tensor]

    def to_full(self, merged: torch.Tensor) -> torch.Tensor:
        """`ΔW = U R̄`."""
        return self.u @ merged


def knots_space(factors: Sequence[Factors | None], in_features: int) -> KnotsSpace:
    """KnOTS: `X = [ΔW_1 … ΔW_T]` (m × T·n), `SVD(X)` on its numerical rank ρ, `R_t` = task
    t's columns of `diag(σ) Vᵀ`.

    X is never formed: `X = B_stack · blockdiag(A_1 … A_T)` and with `B_stack = Q R` (thin QR)
    `X = Q (R · blockdiag(A))`, whose SVD is `Q` times the SVD of the Σr × T·n matrix
    `Y = R · blockdiag(A)`: same singular values, left vectors `Q U_y`; `R_t = U_y[:, :ρ]ᵀ Y_t`
    (task t's columns of `diag(σ) Vᵀ` in exact arithmetic), computed from its own block so that
    a zero task's is exactly zero (Householder QR keeps a zero column of `B_stack` zero in
    `R`), as `core_space` explains.
    """
    present = [f for f in factors if f is not None]
    b_stack = torch.cat([b for _, b in present], dim=1)  # m × Σr
    q, r = torch.linalg.qr(b_stack)  # m × p, p × Σr
    blocks, offset = [], 0
    for f in factors:
        if f is None:
            blocks.append(torch.zeros(r.shape[0], in_features, dtype=r.dtype, device=r.device))
            continue
        a, b = f
        blocks.append(r[:, offset:offset + b.shape[1]] @ a)  # p × n
        offset += b.shape[1]
    u_y, sigma, _ = svd(torch.cat(blocks, dim=1))  # p × T·n
    u_top = u_y[:, :numerical_rank(sigma)]  # p × ρ
    return KnotsSpace(q @ u_top, [u_top.mT @ block for block in blocks])
