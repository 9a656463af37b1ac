"""`dare_linear`, `dare_ties` (METHODS.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch

from merge_service.methods.dare import keep_mask, mask_generator
from tests.methods.helpers import generator, make_task, merge, randn

F64 = torch.float64


def tasks(seed: int = 0, shape: tuple[int, ...] = (40, 30), num_tasks: int = 3,
          name: str = "layers.0.mlp.weight", options_seed: int = 0):
    gen = generator(seed)
    return make_task([randn(gen, *shape) for _ in range(num_tasks)],
                     weights=[1.0, 0.5, 2.0][:num_tasks], name=name, seed=options_seed)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_bit_identical_for_the_same_seed_and_tensor(name: str) -> None:
    assert torch.equal(merge(name, tasks(), density=0.3), merge(name, tasks(), density=0.3))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_another_seed_or_tensor_name_gives_another_mask(name: str) -> None:
    base = merge(name, tasks(), density=0.3)
    assert not torch.equal(base, merge(name, tasks(options_seed=1), density=0.3))
    assert not torch.equal(base, merge(name, tasks(name="layers.1.mlp.weight"), density=0.3))


def test_each_task_gets_its_own_mask() -> None:
    shape = torch.Size([1000])
    masks = [keep_mask(shape, 0.5, mask_generator(0, "w", t)) for t in range(2)]
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], keep_mask(shape, 0.5, mask_generator(0, "w", 0)))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_fraction_is_about_density(density: float) -> None:
    numel = 20_000
    task = tasks(shape=(numel,), num_tasks=2)
    merge("dare_linear", task, density=density)
    std = math.sqrt(density * (1 - density) / numel)
    for fraction in task.diagnostics["kept_fraction"]:
        assert abs(fraction - density) < 5 * std


def test_kept_entries_are_rescaled_by_one_over_density() -> None:
    tau = randn(generator(4), 50, 20)
    task = make_task([tau, torch.zeros_like(tau)], name="x")
    delta = merge("dare_linear", task, density=0.25, alpha=1.0)
    kept = keep_mask(tau.shape, 0.25, mask_generator(0, "x", 0))
    assert torch.equal(delta, torch.where(kept, tau / 0.25, 0))


@pytest.mark.parametrize("shape", [(12, 9), (30,)])
def test_dare_linear_at_density_one_is_task_arithmetic(shape: tuple[int, ...]) -> None:
    # methods own their inputs: each merge gets its own copy
    assert torch.equal(merge("dare_linear", tasks(shape=shape), density=1.0, alpha=0.3),
                       merge("task_arithmetic", tasks(shape=shape), alpha=0.3))


def test_dare_ties_at_density_one_is_ties_at_density_one() -> None:
    assert torch.equal(merge("dare_ties", tasks(), density=1.0, alpha=0.8),
                       merge("ties", tasks(), density=1.0, alpha=0.8))


def test_dare_ties_elects_signs_over_the_weighted_rescaled_vectors() -> None:
    task = tasks(shape=(60, 20))
    originals = [tv.clone() for tv in task.task_vectors]  # merge may overwrite its inputs
    delta = merge("dare_ties", task, density=0.4, alpha=2.0)
    xs = [torch.where(keep_mask(tv.shape, 0.4, mask_generator(0, task.name, t)), tv, 0) / 0.4 * w
          for t, (tv, w) in enumerate(zip(originals, task.weights, strict=True))]
    total = sum(xs)
    gamma = torch.where(total >= 0, 1.0, -1.0).to(F64)
    agree = [(x != 0) & (torch.sign(x) == gamma) for x in xs]
    expected = sum(torch.where(a, x, 0) for a, x in zip(agree, xs, strict=True))
    expected = expected / sum(a.to(F64) for a in agree).clamp_min(1)
    torch.testing.assert_close(delta, 2.0 * expected, rtol=1e-14, atol=1e-14)
