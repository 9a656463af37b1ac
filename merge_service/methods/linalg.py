"""The operations METHODS.md section 0 defines once and every method shares."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction

import torch

RANK_RTOL = 1e-5  # rank(X) = #{σ_i > 1e-5 σ_1}


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `X = U diag(σ) Vᵀ`, σ descending. Returns (U, σ, V) with V (not Vᵀ).

    A wide X is decomposed as `Xᵀ = V diag(σ) Uᵀ`: LAPACK's tall path (QR first) is up to 3x
    faster than its wide one on the CPU for the flat stacks LoRA spaces decompose.
    """
    if x.shape[-2] < x.shape[-1]:
        v, s, uh = torch.linalg.svd(x.mT, full_matrices=False)
        return uh.mT, s, v
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u, s, vh.mT


def svd_of_product(left: torch.Tensor, right: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of `left @ right` (m × r times r × n, r small) without decomposing the
    m × n product: with `left = Q_1 R_1` and `rightᵀ = Q_2 R_2` (thin QRs), `left @ right =
    Q_1 (R_1 R_2ᵀ) Q_2ᵀ`, so `U = Q_1 U_s`, `V = Q_2 V_s` from the SVD of the r × r
    `R_1 R_2ᵀ`. Returns r triplets (the product has no other non-zero singular values)."""
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right.mT)
    u, s, v = svd(r1 @ r2.mT)
    return q1 @ u, s, q2 @ v


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
    p, _, q = svd(x)
    return p @ q.mT


def truncated(x: torch.Tensor, k: int) -> torch.Tensor:
    """`SVD_k(X)`: the best rank-k approximation."""
    u, s, v = svd(x)
    return (u[:, :k] * s[:k]) @ v[:, :k].mT


def weighted_sum(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(xs[0])
    for x, w in zip(xs, weights, strict=True):
        out.add_(x, alpha=w)
    return out


def weighted_sum_(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`Σ_t w_t X_t` accumulated into `xs[0]` (for methods that own their inputs): no
    whole-tensor temporary."""
    total = xs[0] if weights[0] == 1.0 else xs[0].mul_(weights[0])
    for x, w in zip(xs[1:], weights[1:], strict=True):
        total.add_(x, alpha=w)
    return total


def sign_election(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """`γ = sign(Σ_t X_t)` entrywise, +1 where the sum is 0."""
    total = xs[0].clone()
    for x in xs[1:]:  # accumulate: stacking would hold a T-fold copy of the tensor
        total.add_(x)
    gamma = total.sign_()
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


_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24


def kth_largest(values: torch.Tensor, k: int, *, of_magnitude: bool = False) -> torch.Tensor:
    """The k-th largest of non-negative floats (a 0-d tensor), by radix select; with
    `of_magnitude`, the k-th largest |value| of any floats (without forming |values|).

    Non-negative IEEE floats order like their bit patterns read as integers, so the k-th
    largest is found digit by digit (16 bits at a time) from chunked histograms: linear time
    and O(chunk) extra memory. `torch.kthvalue` on an embedding-sized tensor (262M entries)
    takes 14 s and 4 GB extra here; this takes a fraction of that.
    """
    int_dtype = _INT_VIEW[values.element_size()]
    bits = values.reshape(-1).view(int_dtype)
    nbits = 8 * values.element_size()
    magnitude_bits = torch.iinfo(int_dtype).max  # every bit but the sign bit
    prefix, remaining = 0, k
    for shift in range(nbits - 16, -1, -16):
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=values.device)
        for chunk in bits.split(_CHUNK):
            if of_magnitude:
                chunk = chunk & magnitude_bits
            if shift + 16 < nbits:  # only the entries whose higher digits match so far
                chunk = chunk[(chunk >> (shift + 16)) == prefix]
            hist += torch.bincount(((chunk >> shift) & 0xFFFF).long(), minlength=1 << 16)
        from_top = hist.flip(0).cumsum(0)  # from_top[i]: entries with digit >= 65535 - i
        i = int(torch.searchsorted(from_top, remaining))
        remaining -= int(from_top[i - 1]) if i > 0 else 0
        prefix = (prefix << 16) | (0xFFFF - i)
    return torch.tensor(prefix, dtype=bits.dtype, device=values.device).view(values.dtype)


def flat_chunks(xs: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Matching chunks of flat views of equally shaped contiguous tensors. Entrywise rules
    (sign election, disjoint mean, trimming) applied chunk by chunk need O(chunk) temporaries
    instead of several whole-tensor ones: on a 262M-entry embedding, gigabytes."""
    flats = [x.view(-1) for x in xs]
    for start in range(0, flats[0].numel(), _CHUNK):
        yield [f[start:start + _CHUNK] for f in flats]


def magnitude_trim(x: torch.Tensor, density: float, *, inplace: bool = False) -> torch.Tensor:
    """Keep the `floor(density · numel)` entries of largest |x| (ties: lower index first).

    Selection by threshold (k-th largest magnitude) instead of `torch.topk`: linear time and
    memory on embedding-sized tensors, and the tie rule is explicit rather than left to the
    sort implementation. `inplace=True` zeroes the dropped entries of `x` itself when `x` is
    contiguous (else of a contiguous copy); use the returned tensor.
    """
    n = x.numel()
    k = fraction_floor(density, n)
    if k >= n:
        return x if inplace else x.clone()
    if k <= 0:
        return x.zero_() if inplace else torch.zeros_like(x)
    x = x.contiguous() if inplace else x.clone(memory_format=torch.contiguous_format)
    threshold = kth_largest(x, k, of_magnitude=True)
    above = torch.zeros((), dtype=torch.int64, device=x.device)
    for (chunk,) in flat_chunks([x]):
        above += torch.count_nonzero(chunk.abs() > threshold)
    # Entries equal to the threshold: the first `need` by index (there is at least one: the
    # threshold itself).
    need = k - int(above)
    for (chunk,) in flat_chunks([x]):
        mag = chunk.abs()
        keep = mag > threshold
        if need > 0:
            hits = (mag == threshold).nonzero().squeeze(1)[:need]
            keep[hits] = True
            need -= hits.numel()
        chunk.masked_fill_(keep.logical_not_(), 0)
    return x


def elected_disjoint_mean_(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`disjoint_mean(xs, sign_election(xs))`, chunk by chunk, written into `xs[0]` (the
    caller's own tensors; a non-contiguous one is copied first). Also returns the share of the
    non-zero entries whose sign was elected against (a 0-d tensor: no device sync here)."""
    xs = [x.contiguous() for x in xs]
    kept = torch.zeros((), dtype=torch.int64, device=xs[0].device)
    against = torch.zeros((), dtype=torch.int64, device=xs[0].device)
    for parts in flat_chunks(xs):
        gamma = sign_election(parts)
        for x in parts:
            nonzero = x != 0
            kept += nonzero.sum()
            against += (nonzero & (torch.sign(x) != gamma)).sum()
        parts[0].copy_(disjoint_mean(parts, gamma))
    return xs[0], against / kept.clamp_min(1)


def fraction_floor(fraction: float, n: int) -> int:
    """`floor(fraction · n)` in exact arithmetic on the decimal the fraction is written as.

    Params arrive as YAML/JSON text and `repr` gives back the shortest decimal that round-trips,
    so `density: 0.29` of 100 entries is 29, where the float product `int(0.29 * 100)` is 28.
    """
    return math.floor(Fraction(repr(float(fraction))) * n)
