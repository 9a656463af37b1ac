"""`dare_linear` and `dare_ties` (METHODS.md section 4): drop and rescale (Yu et al., 2024).

The keep masks come from a CPU generator seeded by (`options.seed`, tensor name, task index),
so the output is bit-identical across runs, machines and devices.
"""

from __future__ import annotations

import hashlib

import torch
from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import (
    MergeMethod,
    MethodParams,
    SumOfTerms,
    TensorResult,
    TensorTask,
)
from merge_service.methods.linalg import elected_disjoint_mean_


class DareParams(MethodParams):
    density: float = Field(
        0.5, gt=0, le=1,
        description="probability of keeping each entry; kept entries are divided by it",
    )
    alpha: float = Field(1.0, description="scale of the merged task vector")


def mask_generator(seed: int, tensor_name: str, task_index: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, tensor name, task index)."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{task_index}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def keep_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """`M ~ Bernoulli(density)` per entry, drawn on the CPU (bool, CPU)."""
    return torch.rand(shape, generator=generator, dtype=torch.float32) < density


class _Dare(MergeMethod[DareParams]):
    """What both DARE variants share: the rescaled, randomly dropped task vectors."""

    Params = DareParams

    def rescaled(self, task: TensorTask, t: int, task_vector: torch.Tensor) -> torch.Tensor:
        """`τ̂_t = M_t ⊙ τ_t / density`, in place; records the task's kept fraction."""
        p = self.params
        kept = task.diagnostics.setdefault("kept_fraction", [])
        if p.density == 1.0:  # rand() < 1 always: every entry is kept, nothing is rescaled
            kept.append(1.0)
            return task_vector
        mask = keep_mask(task_vector.shape, p.density, mask_generator(task.seed, task.name, t))
        kept.append(int(torch.count_nonzero(mask)) / max(1, task_vector.numel()))
        drop = mask.logical_not_().to(task_vector.device)
        return task_vector.masked_fill_(drop, 0).div_(p.density)


@register
class DareLinear(_Dare, SumOfTerms[DareParams]):
    name = "dare_linear"
    summary = "Drop entries with probability 1 − density, rescale: Δ = alpha · Σ w_t τ̂_t."

    def term(self, task: TensorTask, t: int, task_vector: torch.Tensor) -> torch.Tensor:
        return self.rescaled(task, t, task_vector)

    def finish(self, task: TensorTask, total: torch.Tensor) -> torch.Tensor:
        p = self.params
        return total.mul_(p.alpha)


@register
class DareTies(_Dare):
    name = "dare_ties"
    summary = "DARE drop and rescale, then sign election and disjoint mean of the w_t τ̂_t."

    def merge(self, task: TensorTask) -> TensorResult:
        p = self.params
        # X_t = w_t τ̂_t (no magnitude trim)
        xs = []
        for t, (tv, w) in enumerate(zip(task.task_vectors, task.weights, strict=True)):
            x = self.rescaled(task, t, tv)
            xs.append(x if w == 1.0 else x.mul_(w))
        merged, conflict = elected_disjoint_mean_(xs)
        task.diagnostics["sign_conflict"] = float(conflict)
        return TensorResult(merged.mul_(p.alpha))
