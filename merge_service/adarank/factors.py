"""AdaRank's arithmetic (METHODS.md section 12, steps 1-3) on one tensor.

Per tensor `n` the merge is `θ = θ_b + Σ_t λ_{t,n} X_t` where `X_t` is task t's (weighted) task
vector against `θ_b`. For matrices `X_t = U_t diag(σ̃_t) V_tᵀ` over its numerical rank `r_t`
with `σ̃_t` the straight-through masked singular values; other tensors keep `X_t` whole.

The per-task factors of one matrix are stored side by side (`U` = [U_1 … U_T], m × Σr_t) so
that the merged matrix is one product `(U · coeff) Vᵀ` with `coeff = λ_task(i) σ̃_i`, whatever
the number of tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_service.methods.linalg import fraction_floor, numerical_rank, svd


def straight_through_mask(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`p + stopgrad(b − p)` with `p = sigmoid(m / temperature)`, `b = [p > 0.5]`.

    The value is the hard mask `b`; the gradient is that of the soft mask `p`. Multiplied by σ
    this is `σ̃ = p σ + stopgrad((b − p) σ)` (σ is a constant).
    """
    p = torch.sigmoid(logits / temperature)
    hard = (p > 0.5).to(p.dtype)
    return p + (hard - p).detach()


def hard_mask(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`b = [sigmoid(m / temperature) > 0.5]` as a bool tensor."""
    return torch.sigmoid(logits / temperature) > 0.5


@dataclass
class TensorTerms:
    """One tensor of the merge: its base `θ_b` and every task's part.

    Matrices: `u` (m × K), `sigma` (K), `v` (n × K), K = Σ_t r_t, and `task_of` (K) the task
    each column belongs to; `ranks[t] = r_t`. Other tensors: `dense[t]` = X_t (None: zero).
    """

    name: str
    base: torch.Tensor
    is_matrix: bool
    ranks: list[int]
    u: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    v: torch.Tensor | None = None
    task_of: torch.Tensor | None = None
    dense: list[torch.Tensor | None] | None = None

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    def slices(self) -> list[slice]:
        """The columns of `u`, `v` (entries of `sigma`) that belong to each task."""
        out, start = [], 0
        for r in self.ranks:
            out.append(slice(start, start + r))
            start += r
        return out

    def merged(self, lam: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`θ_b + Σ_t λ_t U_t diag(mask_t σ_t) V_tᵀ` (matrices) or `θ_b + Σ_t λ_t X_t`.

        `lam` (T) holds λ_{t,n}; `mask` (K) the masks of every task's singular values side by
        side (straight-through in training, hard at the end). Differentiable in both.
        """
        if self.is_matrix:
            if self.total_rank == 0:
                return self.base
            assert self.u is not None and self.v is not None and self.sigma is not None
            assert self.task_of is not None and mask is not None
            coeff = lam[self.task_of] * mask * self.sigma  # K
            return self.base + (self.u * coeff) @ self.v.mT
        assert self.dense is not None
        out = self.base
        for t, x in enumerate(self.dense):
            if x is not None:
                out = out + lam[t] * x
        return out


def matrix_terms(name: str, base: torch.Tensor, parts: Sequence[torch.Tensor | None]
                 ) -> TensorTerms:
    """Factor each dense `X_t` (m × n): `SVD(X_t)` kept over its numerical rank `r_t`."""
    us, sigmas, vs, ranks = [], [], [], []
    for x in parts:
        if x is None:
            ranks.append(0)
            continue
        u, s, v = svd(x)
        k = numerical_rank(s)
        us.append(u[:, :k])
        sigmas.append(s[:k])
        vs.append(v[:, :k])
        ranks.append(k)
    return _stacked(name, base, us, sigmas, vs, ranks)


def low_rank_terms(name: str, base: torch.Tensor,
                   factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                   mixing: torch.Tensor) -> TensorTerms:
    """Factor `X_t = Σ_s c_{ts} B_s A_s` without forming any m × n product.

    `factors[s] = (A_s, B_s)` (r_s × n, m × r_s; None for a task without this module) and
    `mixing` = `c` (T × T). With `B_stack = Q_B R_B` and `A_stackᵀ = Q_A R_A` (thin QR):
    `X_t = Q_B K_t Q_Aᵀ`, `K_t = R_B diag(c_t, expanded over each block) R_Aᵀ` (Σr × Σr), so the
    SVD of the small `K_t = P S Qᵀ` gives `U_t = Q_B P`, `σ_t = S`, `V_t = Q_A Q`.
    """
    present = [(s, f) for s, f in enumerate(factors) if f is not None]
    num_tasks = len(factors)
    if not present:
        return _stacked(name, base, [], [], [], [0] * num_tasks)
    a_stack = torch.cat([a for _, (a, _b) in present], dim=0)
    b_stack = torch.cat([b for _, (_a, b) in present], dim=1)
    q_b, r_b = torch.linalg.qr(b_stack)  # m × p, p × Σr
    q_a, r_a = torch.linalg.qr(a_stack.mT)  # n × q, q × Σr
    block_of = torch.cat([torch.full((a.shape[0],), s, dtype=torch.long, device=base.device)
                          for s, (a, _b) in present])
    us, sigmas, vs, ranks = [], [], [], []
    for t in range(num_tasks):
        c = mixing[t].to(base.device, base.dtype)[block_of]  # Σr
        if not bool(c.any()):
            ranks.append(0)
            continue
        p, s, q = svd((r_b * c) @ r_a.mT)  # p × q
        k = numerical_rank(s)
        us.append(q_b @ p[:, :k])
        sigmas.append(s[:k])
        vs.append(q_a @ q[:, :k])
        ranks.append(k)
    return _stacked(name, base, us, sigmas, vs, ranks)


def dense_terms(name: str, base: torch.Tensor, parts: Sequence[torch.Tensor | None]
                ) -> TensorTerms:
    """A non-matrix tensor: each `X_t` kept whole."""
    return TensorTerms(name, base, False, [0] * len(parts), dense=list(parts))


def _stacked(name: str, base: torch.Tensor, us: list[torch.Tensor], sigmas: list[torch.Tensor],
             vs: list[torch.Tensor], ranks: list[int]) -> TensorTerms:
    m, n = base.shape
    task_of = torch.cat([torch.full((r,), t, dtype=torch.long, device=base.device)
                         for t, r in enumerate(ranks)]) if ranks else \
        torch.zeros(0, dtype=torch.long, device=base.device)
    return TensorTerms(
        name, base, True, ranks,
        u=torch.cat(us, dim=1) if us else base.new_zeros(m, 0),
        sigma=torch.cat(sigmas) if sigmas else base.new_zeros(0),
        v=torch.cat(vs, dim=1) if vs else base.new_zeros(n, 0),
        task_of=task_of,
    )


def initial_logits(ranks: Sequence[int], initial_rank_ratio: float, *, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """+0.1 for the first `floor(initial_rank_ratio · r_t)` values of each task, −0.1 after."""
    parts = []
    for r in ranks:
        keep = fraction_floor(initial_rank_ratio, r)
        logits = torch.full((r,), -0.1, dtype=dtype, device=device)
        logits[:keep] = 0.1
        parts.append(logits)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
