"""`cart` (METHODS.md section 9)."""

from __future__ import annotations

import pytest
import torch

from merge_service.methods.linalg import truncated
from tests.methods.helpers import generator, make_task, merge, randn

F64 = torch.float64
WEIGHTS = [1.0, 2.0, 0.5]


def weighted_mean(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * t for w, t in zip(weights, taus, strict=True)) / sum(weights)


def taus(seed: int, *shape: int) -> list[torch.Tensor]:
    gen = generator(seed)
    return [randn(gen, *shape) for _ in range(3)]


@pytest.mark.parametrize("alpha", [2.0, -1.0])
def test_rank_fraction_one_gives_the_weighted_average(alpha: float) -> None:
    xs = taus(0, 9, 7)
    delta = merge("cart", make_task(xs, WEIGHTS), rank_fraction=1.0, alpha=alpha)
    torch.testing.assert_close(delta, weighted_mean(xs, WEIGHTS), rtol=1e-10, atol=1e-10)


def test_alpha_zero_gives_the_weighted_average() -> None:
    xs = taus(1, 9, 7)
    delta = merge("cart", make_task(xs, WEIGHTS), rank_fraction=0.3, alpha=0.0)
    torch.testing.assert_close(delta, weighted_mean(xs, WEIGHTS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "rank_fraction", "k"), [
    ((12, 10), 0.3, 3), ((12, 10), 0.12, 1), ((4, 5), 0.12, 1), ((20, 25), 0.12, 2),
])
def test_adds_alpha_times_the_rank_k_deviations(shape: tuple[int, int], rank_fraction: float,
                                                k: int) -> None:
    xs = taus(2, *shape)
    task = make_task(xs, WEIGHTS)
    delta = merge("cart", task, rank_fraction=rank_fraction, alpha=1.5)
    mean = weighted_mean(xs, WEIGHTS)
    expected = mean + 1.5 * sum(w * truncated(x - mean, k)
                                for w, x in zip(WEIGHTS, xs, strict=True))
    torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-12)
    assert task.diagnostics["rank"] == k


@pytest.mark.parametrize(("shape", "name"), [((7,), "layers.0.bias"), ((2, 3, 4), "conv.weight"),
                                             ((8, 6), "lm_head.weight")])
def test_non_matrix_is_the_weighted_average(shape: tuple[int, ...], name: str) -> None:
    xs = taus(3, *shape)
    delta = merge("cart", make_task(xs, WEIGHTS, name=name))
    torch.testing.assert_close(delta, weighted_mean(xs, WEIGHTS), rtol=1e-14, atol=1e-14)


def test_equal_task_vectors_give_that_task_vector() -> None:
    x = randn(generator(4), 6, 6)
    delta = merge("cart", make_task([x, x.clone()]))
    torch.testing.assert_close(delta, x, rtol=1e-12, atol=1e-12)
