"""`tsv` (METHODS.md section 5)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.methods.helpers import (
    generator,
    low_rank,
    make_task,
    merge,
    orthonormal,
    randn,
    rank,
    singular_values,
)

F64 = torch.float64


def orthogonal_tasks(seed: int, m: int, n: int, ranks: list[int]):
    """τ_t = U_t diag(σ_t) V_tᵀ with U_t, V_t disjoint column blocks of orthogonal matrices."""
    gen = generator(seed)
    u, v = orthonormal(gen, m, sum(ranks)), orthonormal(gen, n, sum(ranks))
    taus, sigmas, start = [], [], 0
    for k in ranks:
        sigma = torch.rand(k, generator=gen, dtype=F64) * 3 + 0.5
        block = slice(start, start + k)
        taus.append((u[:, block] * sigma) @ v[:, block].mT)
        sigmas.append(sigma)
        start += k
    return taus, sigmas


def test_orthogonal_task_subspaces_keep_their_singular_values() -> None:
    # m × n = 14 × 12, T = 3: r // T = 4 = rank of each task
    taus, sigmas = orthogonal_tasks(0, 14, 12, [4, 4, 4])
    weights = [1.0, 0.5, 2.0]
    task = make_task(taus, weights)
    delta = merge("tsv", task, alpha=1.5)
    expected = torch.cat([w * s for w, s in zip(weights, sigmas, strict=True)])
    expected = 1.5 * expected.sort(descending=True).values
    torch.testing.assert_close(singular_values(delta)[:12], expected, rtol=1e-12, atol=1e-12)
    assert task.diagnostics["interference"] < 1e-12
    assert task.diagnostics["kept_rank"] == [4, 4, 4]
    # no interference: Δ = alpha · Σ w_t τ_t
    torch.testing.assert_close(delta, 1.5 * sum(w * t for w, t in zip(weights, taus, strict=True)),
                               rtol=1e-12, atol=1e-12)


def test_each_task_keeps_its_top_r_over_t_directions() -> None:
    taus, sigmas = orthogonal_tasks(1, 12, 10, [5, 5])
    taus.append(torch.zeros_like(taus[0]))  # T = 3: r // T = 3 (int(10 · (1/3)) would be 3 too)
    delta = merge("tsv", make_task(taus))
    expected = torch.cat([s.sort(descending=True).values[:3] for s in sigmas])
    torch.testing.assert_close(singular_values(delta)[:6], expected.sort(descending=True).values,
                               rtol=1e-12, atol=1e-12)
    assert rank(delta) == 6


def test_rank_is_capped_at_the_numerical_rank() -> None:
    gen = generator(2)
    taus = [low_rank(gen, 9, 8, 1), low_rank(gen, 9, 8, 2)]  # r // T = 4
    task = make_task(taus)
    delta = merge("tsv", task)
    assert task.diagnostics["kept_rank"] == [1, 2]
    assert rank(delta) == 3


def test_interference_is_reported_for_overlapping_subspaces() -> None:
    gen = generator(3)
    task = make_task([randn(gen, 10, 8) for _ in range(2)])
    merge("tsv", task)
    assert task.diagnostics["interference"] > 1e-3


def test_report_holds_each_weighted_task_s_leading_singular_values() -> None:
    # the dashboard draws these spectra; at most SPECTRUM_LENGTH (64) per task, descending
    from merge_service.methods.tsv import SPECTRUM_LENGTH

    gen = generator(4)
    taus = [randn(gen, 80, 70), randn(gen, 80, 70)]
    weights = [1.0, 0.5]
    task = make_task(taus, weights)
    merge("tsv", task)
    spectra = task.diagnostics["singular_values"]
    assert [len(s) for s in spectra] == [SPECTRUM_LENGTH, SPECTRUM_LENGTH]
    for values, tau, w in zip(spectra, taus, weights, strict=True):
        expected = singular_values(w * tau)[:SPECTRUM_LENGTH]
        torch.testing.assert_close(torch.tensor(values, dtype=F64), expected, rtol=1e-5, atol=0)
        assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(("shape", "name", "params"), [
    ((5,), "layers.0.bias", {}),
    ((2, 3, 4), "conv.weight", {}),
    ((8, 6), "model.embed_tokens.weight", {}),
    ((8, 6), "model.layers.0.q_proj.weight", {"svd_exclude": ["q_proj"]}),
])
def test_non_matrix_rule_is_the_weighted_mean(shape: tuple[int, ...], name: str,
                                             params: dict) -> None:
    gen = generator(4)
    taus = [randn(gen, *shape) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    delta = merge("tsv", make_task(taus, weights, name=name), alpha=0.9, **params)
    expected = 0.9 * sum(w * t for w, t in zip(weights, taus, strict=True)) / 3
    torch.testing.assert_close(delta, expected, rtol=1e-14, atol=1e-14)


def test_more_tasks_than_rank_gives_zero() -> None:
    gen = generator(5)
    task = make_task([randn(gen, 2, 6) for _ in range(3)])  # r // T = 0
    assert torch.equal(merge("tsv", task), torch.zeros(2, 6, dtype=F64))
    assert task.diagnostics["interference"] == 0.0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(2, 4), data=st.data())
def test_invariant_under_reordering_the_models(seed: int, num_tasks: int,
                                               data: st.DataObject) -> None:
    gen = generator(seed)
    taus = [randn(gen, 10, 9) for _ in range(num_tasks)]
    weights = [1.0 + 0.5 * t for t in range(num_tasks)]
    order = data.draw(st.permutations(range(num_tasks)))
    a = merge("tsv", make_task(taus, weights))
    b = merge("tsv", make_task([taus[i] for i in order], [weights[i] for i in order]))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, -1.0]])
def test_low_rank_factors_give_the_same_merge(weights: list[float]) -> None:
    """LoRA cores come with their factors (`TensorTask.factors`): each task's SVD is then
    taken from them (r_t × r_t work), and the merge is the one of the plain matrices."""
    gen = generator(9)
    pairs = [(randn(gen, 24, r), randn(gen, r, 30)) for r in (3, 5, 2)]
    taus = [left @ right for left, right in pairs]
    plain = make_task([t.clone() for t in taus], weights)
    factored = make_task([t.clone() for t in taus], weights)
    factored.factors = [*pairs[:2], None]  # a task may come without factors
    expected, got = merge("tsv", plain), merge("tsv", factored)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert factored.diagnostics["kept_rank"] == plain.diagnostics["kept_rank"]
    # decomposed from the factors: r_t singular values (the rest are zero), not min(m, n)
    assert [len(s) for s in factored.diagnostics["singular_values"]] == [3, 5, 24]
    torch.testing.assert_close(torch.tensor(factored.diagnostics["interference"]),
                               torch.tensor(plain.diagnostics["interference"]),
                               rtol=1e-9, atol=1e-12)
