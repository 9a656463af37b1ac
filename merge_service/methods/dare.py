"""`dare_linear` and `dare_ties` (METHODS.md section 4): drop and rescale (Yu et al., 2024).

The keep masks come from a CPU generator seeded by (`options.seed`, tensor name, task index),
so the output is bit-identical across runs, machines and devices.
"""

from __future__ import annotations

import hashlib

import torch
from pydantic import Field

from merge_service.methods import register
from merge_service.methods.base import MergeMethod, MethodParams, TensorResult, TensorTask
from merge_service.methods.linalg import disjoint_mean, sign_election, weighted_sum_


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


class _Dare(MergeMethod):
    """What both DARE variants share: the rescaled, randomly dropped task vectors."""

    Params = DareParams

    def drop_and_rescale(self, task: TensorTask) -> list[torch.Tensor]:
        """`τ̂_t = M_t ⊙ τ_t / density`; records each task's kept fraction."""
        p: DareParams = self.params  # type: ignore[assignment]
        if p.density == 1.0:  # rand() < 1 always: every entry is kept, nothing is rescaled
            task.diagnostics["kept_fraction"] = [1.0] * task.num_tasks
            return list(task.task_vectors)
        rescaled: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []
        for t, tv in enumerate(task.task_vectors):
            mask = keep_mask(tv.shape, p.density, mask_generator(task.seed, task.name, t))
            kept.append(torch.count_nonzero(mask))  # counted on the CPU: no device sync
            drop = mask.logical_not_().to(tv.device)
            rescaled.append(tv.masked_fill_(drop, 0).div_(p.density))  # in place: τ_t is ours
        numel = max(1, task.task_vectors[0].numel())
        task.diagnostics["kept_fraction"] = [int(k) / numel for k in kept]
        return rescaled


@register
class DareLinear(_Dare):
    name = "dare_linear"
    summary = "Drop entries with probability 1 − density, rescale: Δ = alpha · Σ w_t τ̂_t."

    def merge(self, task: TensorTask) -> TensorResult:
        p: DareParams = self.params  # type: ignore[assignment]
        rescaled = self.drop_and_rescale(task)
        return TensorResult(weighted_sum_(rescaled, task.weights).mul_(p.alpha))


@register
class DareTies(_Dare):
    name = "dare_ties"
    summary = "DARE drop and rescale, then sign election and disjoint mean of the w_t τ̂_t."

    def merge(self, task: TensorTask) -> TensorResult:
        p: DareParams = self.params  # type: ignore[assignment]
        # X_t = w_t τ̂_t (no magnitude trim)
        xs = [x if w == 1.0 else x * w
              for x, w in zip(self.drop_and_rescale(task), task.weights, strict=True)]
        return TensorResult(p.alpha * disjoint_mean(xs, sign_election(xs)))
