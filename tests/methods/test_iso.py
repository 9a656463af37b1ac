"""`iso_c` and `iso_cts` (METHODS.md sections 7, 8)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_service.methods.iso import iso_cts_split
from tests.methods.helpers import (
    generator,
    low_rank,
    make_task,
    merge,
    randn,
    rank,
    singular_values,
)

F64 = torch.float64


def test_iso_c_flattens_the_spectrum_of_the_sum() -> None:
    gen = generator(0)
    taus = [randn(gen, 9, 7) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    total = sum(w * t for w, t in zip(weights, taus, strict=True))
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    delta = merge("iso_c", make_task(taus, weights), alpha=1.3)
    torch.testing.assert_close(singular_values(delta), torch.full((7,), 1.3 * s.mean(), dtype=F64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta, 1.3 * s.mean() * u @ vh, rtol=1e-12, atol=1e-12)


def test_iso_c_keeps_the_rank_of_the_sum() -> None:
    gen = generator(1)
    taus = [low_rank(gen, 10, 8, 1), low_rank(gen, 10, 8, 2)]
    task = make_task(taus)
    delta = merge("iso_c", task)
    s = singular_values(taus[0] + taus[1])[:3]
    assert rank(delta) == 3 == task.diagnostics["rank"]
    torch.testing.assert_close(singular_values(delta)[:3], torch.full((3,), s.mean(), dtype=F64),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
@pytest.mark.parametrize(("shape", "layer"), [((6,), "layers.0.bias"), ((2, 3, 4), "conv.weight"),
                                              ((8, 6), "transformer.wte.weight")])
def test_non_matrix_rule_is_the_weighted_mean(name: str, shape: tuple[int, ...],
                                             layer: str) -> None:
    gen = generator(2)
    taus = [randn(gen, *shape) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    delta = merge(name, make_task(taus, weights, name=layer), alpha=0.7)
    expected = 0.7 * sum(w * t for w, t in zip(weights, taus, strict=True)) / 3
    torch.testing.assert_close(delta, expected, rtol=1e-14, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(2, 4), data=st.data())
def test_iso_c_invariant_under_reordering_the_models(seed: int, num_tasks: int,
                                                     data: st.DataObject) -> None:
    gen = generator(seed)
    taus = [randn(gen, 8, 6) for _ in range(num_tasks)]
    weights = [1.0 + t for t in range(num_tasks)]
    order = data.draw(st.permutations(range(num_tasks)))
    a = merge("iso_c", make_task(taus, weights))
    b = merge("iso_c", make_task([taus[i] for i in order], [weights[i] for i in order]))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("r", "num_tasks", "common_fraction", "expected"), [
    (10, 2, 0.8, (8, 1)),   # k = 8, s = round(1.0) = 1
    (10, 4, 0.8, (10, 0)),  # k = 8, s = round(0.5) = 0 (half to even)
    (14, 4, 0.8, (10, 1)),  # k = 11, s = round(0.75) = 1
    (10, 4, 0.4, (2, 2)),   # k = 4, s = round(1.5) = 2 (half to even)
    (20, 4, 0.5, (12, 2)),  # k = 10, s = round(2.5) = 2 (half to even)
    (10, 4, 0.5, (6, 1)),   # k = 5, s = round(1.25) = 1
    (768, 8, 0.8, (616, 19)),  # k = 614, s = round(19.25) = 19
    (10, 3, 1.0, (10, 0)),  # all common
    (9, 3, 0.0, (0, 3)),    # all task-specific
    (3, 2, 0.0, (1, 1)),    # s = round(1.5) = 2 would need 4 > r directions: s = r // T
])
def test_iso_cts_split(r: int, num_tasks: int, common_fraction: float,
                       expected: tuple[int, int]) -> None:
    common, per_task = iso_cts_split(r, num_tasks, common_fraction)
    assert (common, per_task) == expected
    assert common >= 0 and common + per_task * num_tasks == r


def iso_cts_reference(xs: list[torch.Tensor], common_fraction: float, alpha: float):
    """METHODS.md section 8, written out with full SVDs."""
    r = min(xs[0].shape)
    common, s = iso_cts_split(r, len(xs), common_fraction)
    u, sig, vh = torch.linalg.svd(sum(xs), full_matrices=False)
    us, sigs, vs = [u[:, :common]], [sig[:common]], [vh[:common].mT]
    for x in xs:
        uk = u[:, :common]
        ut, st_, vth = torch.linalg.svd(x - uk @ uk.mT @ x, full_matrices=False)
        us.append(ut[:, :s])
        sigs.append(st_[:s])
        vs.append(vth[:s].mT)

    def polar(a: torch.Tensor) -> torch.Tensor:
        p, _, qh = torch.linalg.svd(a, full_matrices=False)
        return p @ qh

    return alpha * torch.cat(sigs).mean() * polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).mT


@pytest.mark.parametrize(("shape", "num_tasks", "common_fraction"), [
    ((12, 10), 2, 0.8), ((10, 14), 3, 0.5), ((9, 9), 3, 0.0), ((8, 6), 2, 1.0),
])
def test_iso_cts_follows_the_definition(shape: tuple[int, int], num_tasks: int,
                                        common_fraction: float) -> None:
    gen = generator(3)
    taus = [randn(gen, *shape) for _ in range(num_tasks)]
    weights = [1.0, 0.5, 2.0][:num_tasks]
    task = make_task(taus, weights)
    delta = merge("iso_cts", task, alpha=1.2, common_fraction=common_fraction)
    xs = [w * t for w, t in zip(weights, taus, strict=True)]
    torch.testing.assert_close(delta, iso_cts_reference(xs, common_fraction, 1.2),
                               rtol=1e-10, atol=1e-10)
    common, per_task = iso_cts_split(min(shape), num_tasks, common_fraction)
    assert (task.diagnostics["common_rank"], task.diagnostics["task_rank"]) == (common, per_task)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(2, 4),
       common_fraction=st.floats(0.0, 1.0), alpha=st.floats(0.1, 3.0))
def test_iso_cts_spectrum_is_flat_on_the_stacked_rank(seed: int, num_tasks: int,
                                                      common_fraction: float,
                                                      alpha: float) -> None:
    gen = generator(seed)
    taus = [randn(gen, 11, 9) for _ in range(num_tasks)]
    delta = merge("iso_cts", make_task(taus), alpha=alpha, common_fraction=common_fraction)
    # generic inputs: both stacks have full column rank r = 9, so all 9 values are alpha · σ̄
    s = singular_values(delta)
    torch.testing.assert_close(s, torch.full_like(s, s.mean().item()), rtol=1e-10, atol=1e-10)
    reference = iso_cts_reference(taus, common_fraction, alpha)
    torch.testing.assert_close(s, singular_values(reference), rtol=1e-10, atol=1e-10)


def test_iso_cts_all_common_is_the_flattened_sum() -> None:
    gen = generator(4)
    taus = [randn(gen, 7, 5) for _ in range(2)]
    u, s, vh = torch.linalg.svd(taus[0] + taus[1], full_matrices=False)
    delta = merge("iso_cts", make_task(taus), common_fraction=1.0, alpha=0.5)
    torch.testing.assert_close(delta, 0.5 * s.mean() * u @ vh, rtol=1e-12, atol=1e-12)
