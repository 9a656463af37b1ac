"""The operations METHODS.md section 0 defines once and every method shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

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


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of non-negative floats (a 0-d tensor), by radix select.

    Non-negative IEEE floats order like their bit patterns read as integers, so the k-th
    largest is found digit by digit (16 bits at a time) from chunked histograms: linear time
    and O(chunk) extra memory. `torch.kthvalue` on an embedding-sized tensor (262M entries)
    takes 14 s and 4 GB extra here; this takes a fraction of that.
    """
    bits = values.reshape(-1).view(_INT_VIEW[values.element_size()])
    nbits = 8 * values.element_size()
    prefix, remaining = 0, k
    for shift in range(nbits - 16, -1, -16):
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=values.device)
        for chunk in bits.split(_CHUNK):
            if shift + 16 < nbits:  # only the entries whose higher digits match so far
                chunk = chunk[(chunk >> (shift + 16)) == prefix]
            hist += torch.bincount(((chunk >> shift) & 0xFFFF).long(), minlength=1 << 16)
        from_top = hist.flip(0).cumsum(0)  # from_top[i]: entries with digit >= 65535 - i
        i = int(torch.searchsorted(from_top, remaining))
        remaining -= int(from_top[i - 1]) if i > 0 else 0
        prefix = (prefix << 16) | (0xFFFF - i)
    return torch.tensor(prefix, dtype=bits.dtype, device=values.device).view(values.dtype)


def magnitude_trim(x: torch.Tensor, density: float, *, inplace: bool = False) -> torch.Tensor:
    """Keep the `floor(density · numel)` entries of largest |x| (ties: lower index first).

    Selection by threshold (k-th largest magnitude) instead of `torch.topk`: linear time and
    memory on embedding-sized tensors, and the tie rule is explicit rather than left to the
    sort implementation. `inplace=True` zeroes the dropped entries of `x` itself.
    """
    n = x.numel()
    k = fraction_floor(density, n)
    if k >= n:
        return x if inplace else x.clone()
    if k <= 0:
        return x.zero_() if inplace else torch.zeros_like(x)
    mag = x.reshape(-1).abs()
    threshold = kth_largest(mag, k)
    keep = mag > threshold
    need = k - int(torch.count_nonzero(keep))
    # Entries equal to the threshold: the first `need` by index, scanning in chunks and
    # stopping early (there is at least one: the threshold itself).
    for start in range(0, n, _CHUNK):
        if need <= 0:
            break
        hits = (mag[start:start + _CHUNK] == threshold).nonzero().squeeze(1)[:need]
        keep[hits + start] = True
        need -= hits.numel()
    del mag
    drop = keep.logical_not_().reshape(x.shape)
    return x.masked_fill_(drop, 0) if inplace else x.masked_fill(drop, 0)


def fraction_floor(fraction: float, n: int) -> int:
    """`floor(fraction · n)` in exact arithmetic on the decimal the fraction is written as.

    Params arrive as YAML/JSON text and `repr` gives back the shortest decimal that round-trips,
    so `density: 0.29` of 100 entries is 29, where the float product `int(0.29 * 100)` is 28.
    """
    return math.floor(Fraction(repr(float(fraction))) * n)
