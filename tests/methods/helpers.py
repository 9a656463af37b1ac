"""Small builders shared by the method tests: float64 tensors from seeded generators."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from merge_service.methods import MergeMethod, TensorResult, TensorTask, build_method


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def orthonormal(gen: torch.Generator, m: int, k: int) -> torch.Tensor:
    """m × k with orthonormal columns."""
    q, _ = torch.linalg.qr(randn(gen, m, k))
    return q


def low_rank(gen: torch.Generator, m: int, n: int, rank: int) -> torch.Tensor:
    return randn(gen, m, rank) @ randn(gen, rank, n)


def make_task(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    name: str = "layers.0.mlp.weight",
    seed: int = 0,
) -> TensorTask:
    # The method owns its task vectors and may overwrite them (as the engine allows): hand it
    # copies so that tests can keep comparing against the originals.
    tvs = [tv.clone() for tv in task_vectors]
    return TensorTask(
        name=name,
        task_vectors=tvs,
        weights=list(weights) if weights is not None else [1.0] * len(tvs),
        task_names=[f"task{t}" for t in range(len(tvs))],
        seed=seed,
        is_2d=tvs[0].dim() == 2,
    )


def method(name: str, **params: Any) -> MergeMethod:
    built, problems = build_method(name, params)
    assert built is not None, problems
    return built


def merge(name: str, task: TensorTask, **params: Any) -> torch.Tensor:
    result: TensorResult = method(name, **params).merge(task)
    assert result.delta is not None
    return result.delta


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x)


def rank(x: torch.Tensor, rtol: float = 1e-8) -> int:
    s = torch.linalg.svdvals(x)
    return int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
