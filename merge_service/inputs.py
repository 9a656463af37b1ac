"""Task inputs: where the task vector `τ_t` of one tensor comes from.

A full checkpoint gives `τ_t = θ_t − θ0`; a LoRA adapter gives `ΔW_t = s_t B_t A_t` for the
modules it adapts and `θ_t − θ0` for the other tensors it carries (`modules_to_save`, biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_service.errors import CorruptTensorError, Problem
from merge_service.sources.checkpoint import Checkpoint
from merge_service.sources.lora import LoraAdapter
from merge_service.sources.resolve import ResolvedSource


@dataclass
class TaskInput:
    name: str  # task name
    source: ResolvedSource
    weight: float
    model: Checkpoint | LoraAdapter

    @property
    def is_lora(self) -> bool:
        return isinstance(self.model, LoraAdapter)

    def touches(self, tensor: str) -> bool:
        if isinstance(self.model, LoraAdapter):
            return tensor in self.model.modules or tensor in self.model.extras
        return tensor in self.model.tensors

    def task_vector(self, tensor: str, base: torch.Tensor, out: torch.Tensor | None = None
                    ) -> torch.Tensor | None:
        """`τ_t` of `tensor` in `base`'s dtype and device, or None where this task is zero.

        `out` (shaped like `base`) is a buffer to write it into: reusing one saves allocating
        and first-touching a fresh tensor per task, which costs as much as the arithmetic."""
        if isinstance(self.model, LoraAdapter):
            if tensor in self.model.modules:
                a, b, scale = self.model.factors(tensor)
                a = self._checked(a.to(base.device, base.dtype), tensor)
                b = self._checked(b.to(base.device, base.dtype), tensor)
                return torch.matmul(b * scale, a, out=out)
            if tensor not in self.model.extras:
                return None
            value = self.model.extra(tensor)
        else:
            value = self.model.get(tensor)
        if out is None:
            out = value.to(base.device, base.dtype)
        else:
            out.copy_(value)
        return self._checked(out, tensor).sub_(base)

    def lora_factors(self, tensor: str, like: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(A_t, w_t s_t B_t)` of a LoRA module, in `like`'s dtype and device; None where this
        adapter does not adapt `tensor`."""
        if not isinstance(self.model, LoraAdapter) or tensor not in self.model.modules:
            return None
        a, b, scale = self.model.factors(tensor)
        a = self._checked(a.to(like.device, like.dtype), tensor)
        b = self._checked(b.to(like.device, like.dtype), tensor)
        return a, b * (self.weight * scale)

    def _checked(self, value: torch.Tensor, tensor: str) -> torch.Tensor:
        # a sum is finite when every entry is (a fast reduction); only a non-finite sum, which
        # an overflow could also give, pays for the entry-wise check
        if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
            raise CorruptTensorError(Problem("contains NaN or Inf values", model=self.name,
                                             tensor=tensor))
        return value

    def close(self) -> None:
        self.model.close()
