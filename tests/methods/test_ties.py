"""`ties` (METHODS.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.methods.helpers import generator, make_task, merge, randn

F64 = torch.float64


@pytest.mark.parametrize("shape", [(9, 7), (50,), (2, 3, 4)])
def test_density_one_with_one_nonzero_task_returns_alpha_w_tau(shape: tuple[int, ...]) -> None:
    tau = randn(generator(0), *shape)
    task = make_task([torch.zeros(shape, dtype=F64), tau], weights=[3.0, -0.5])
    delta = merge("ties", task, density=1.0, alpha=0.7)
    torch.testing.assert_close(delta, 0.7 * (-0.5 * tau), rtol=0, atol=1e-15)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.29, 0.5, 0.99])
@pytest.mark.parametrize("shape", [(10, 10), (37,)])
def test_kept_count_is_floor_density_numel(density: float, shape: tuple[int, ...]) -> None:
    tau = randn(generator(1), *shape)
    task = make_task([tau, torch.zeros(shape, dtype=F64)])
    delta = merge("ties", task, density=density)
    # exact decimal arithmetic: floor(0.29 · 100) = 29
    expected = math.floor(round(density * 100) * math.prod(shape) / 100)
    assert int((delta != 0).sum()) == expected
    kept = delta != 0
    assert torch.equal(delta[kept], tau[kept])
    assert tau[kept].abs().min() > tau[~kept].abs().max()


def test_hand_checked_sign_election_and_disjoint_mean() -> None:
    tau1 = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=F64)
    tau2 = torch.tensor([-4.0, 2.0, 1.0, 0.1], dtype=F64)
    # k = 2: trim(τ1) = [3, 0, 2, 0], trim(τ2) = [-4, 2, 0, 0]; Σ = [-1, 2, 2, 0]
    # γ = [-, +, +, +(zero sum)]; agreeing entries: [-4], [2], [2], none
    delta = merge("ties", make_task([tau1, tau2]), density=0.5, alpha=0.5)
    assert delta.tolist() == [-2.0, 1.0, 1.0, 0.0]
    # w = [1, 0.5]: X2 = [-2, 1, 0, 0]; Σ = [1, 1, 2, 0]: γ = +1 everywhere
    delta = merge("ties", make_task([tau1, tau2], weights=[1.0, 0.5]), density=0.5)
    assert delta.tolist() == [3.0, 1.0, 2.0, 0.0]


def test_disjoint_mean_averages_the_agreeing_entries_only() -> None:
    xs = [torch.tensor([1.0, 2.0, -6.0], dtype=F64), torch.tensor([3.0, -1.0, 4.0], dtype=F64),
          torch.tensor([-1.0, 0.0, 1.0], dtype=F64)]
    # Σ = [3, 1, -1]: γ = [+, +, -]
    delta = merge("ties", make_task(xs), density=1.0)
    assert delta.tolist() == [2.0, 2.0, -6.0]


def test_sign_conflict_diagnostic() -> None:
    xs = [torch.tensor([1.0, 2.0, -6.0], dtype=F64), torch.tensor([3.0, -1.0, 4.0], dtype=F64)]
    task = make_task(xs)
    merge("ties", task, density=1.0)
    # γ = [+, +, -]: 2 of the 6 kept entries are against it
    assert task.diagnostics["sign_conflict"] == pytest.approx(2 / 6)


def test_matrix_names_in_the_svd_exclude_list_are_treated_alike() -> None:
    gen = generator(3)
    xs = [randn(gen, 6, 5) for _ in range(3)]
    a = merge("ties", make_task(xs, name="model.embed_tokens.weight"))
    b = merge("ties", make_task(xs, name="model.layers.0.q_proj.weight"))
    assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(2, 5),
       density=st.floats(0.05, 1.0), data=st.data())
def test_invariant_under_reordering_the_models(seed: int, num_tasks: int, density: float,
                                               data: st.DataObject) -> None:
    gen = generator(seed)
    xs = [randn(gen, 8, 6) for _ in range(num_tasks)]
    weights = [0.5 + t for t in range(num_tasks)]
    order = data.draw(st.permutations(range(num_tasks)))
    a = merge("ties", make_task(xs, weights), density=density)
    b = merge("ties", make_task([xs[i] for i in order], [weights[i] for i in order]),
              density=density)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
