"""The shared operations of METHODS.md section 0 that the sections 3-9 methods rely on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_service.methods.linalg import fraction_floor, magnitude_trim
from tests.methods.helpers import generator, randn


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=st.sampled_from([(1,), (7,), (64,), (5, 9), (3, 4, 5), (257,)]),
    density=st.floats(0.01, 1.0),
)
def test_magnitude_trim_keeps_the_topk_set(seed: int, shape: tuple[int, ...],
                                           density: float) -> None:
    x = randn(generator(seed), *shape)  # continuous: no ties
    kept = magnitude_trim(x, density)
    k = fraction_floor(density, x.numel())  # floor of the decimal, not of the float product
    assert int((kept != 0).sum()) == k
    expected = torch.zeros(x.numel(), dtype=torch.bool)
    if k:
        expected[torch.topk(x.reshape(-1).abs(), k).indices] = True
    assert torch.equal(kept.reshape(-1) != 0, expected)
    assert torch.equal(kept[kept != 0], x[kept != 0])


def test_magnitude_trim_breaks_ties_by_lower_index() -> None:
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0], dtype=torch.float64)
    assert magnitude_trim(x, 0.5).tolist() == [0.0, -2.0, 2.0, 0.0, -2.0, 0.0]


@pytest.mark.parametrize(("fraction", "n", "expected"), [
    (0.29, 100, 29),  # int(0.29 * 100) == 28
    (0.12, 768, 92), (0.8, 5, 4), (1.0, 7, 7), (0.2, 4, 0), (0.5, 0, 0), (1e-5, 10**6, 10),
])
def test_fraction_floor_is_exact_on_the_written_decimal(fraction: float, n: int,
                                                        expected: int) -> None:
    assert fraction_floor(fraction, n) == expected


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), m=st.integers(2, 40), n=st.integers(2, 40),
       r=st.integers(1, 8))
def test_svd_of_a_product_from_its_factors(seed: int, m: int, n: int, r: int) -> None:
    """`svd_of_product(L, R)` is a thin SVD of `L @ R`: orthonormal U and V, σ descending and
    equal to the product's own leading singular values, `U diag(σ) Vᵀ = L R`."""
    from merge_service.methods.linalg import svd_of_product

    gen = generator(seed)
    left, right = randn(gen, m, r), randn(gen, r, n)
    u, s, v = svd_of_product(left, right)
    k = min(m, n, r)
    assert u.shape == (m, k) and s.shape == (k,) and v.shape == (n, k)
    torch.testing.assert_close((u * s) @ v.mT, left @ right, rtol=0, atol=1e-10)
    torch.testing.assert_close(u.mT @ u, torch.eye(k, dtype=u.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(v.mT @ v, torch.eye(k, dtype=v.dtype), rtol=0, atol=1e-12)
    full = torch.linalg.svdvals(left @ right)
    torch.testing.assert_close(s, full[:k], rtol=0, atol=1e-10 * float(full[0]))
    assert bool((s[:-1] >= s[1:]).all())
