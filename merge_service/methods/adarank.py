"""`adarank` (METHODS.md section 12): learned singular-value masks and per-tensor coefficients.

AdaRank (Lee et al., 2025) is the one method that needs the whole model: the masks and the
coefficients λ are learned by minimising the entropy of every task's predictions on unlabeled
calibration inputs, through a forward of the merged model. The engine runs it as a whole-model
step (a `WholeModelMethod`): `whole_model_problems` at preflight, then `optimize` before the
output is written; the arithmetic is in `merge_service.adarank`.

Where METHODS.md leaves a choice open, we take these (README, "AdaRank"):
- `X_t = w_t (θ_t − θ_b)`: the per-model weight scales the task vector as in every other
  method, so that all masks kept and λ = 1 is task arithmetic with alpha 1 for any weights.
- Batches: each step draws `batch_size` inputs per task from a per-pass permutation seeded by
  (`options.seed`, task name) on the CPU; runs are reproducible.
- Causal LMs: the mean over the batch's non-padding positions (each position is one x).
- Texts are truncated to 512 tokens (or the model's limit when lower).
- The loss curve is the summed minibatch entropy at each step, before its update; the report
  adds each task's entropy over its whole calibration set before and after, with hard masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from merge_service.errors import Problem
from merge_service.methods import register
from merge_service.methods.base import SvdParams, WholeModelMethod

if TYPE_CHECKING:
    from merge_service.adarank.optimize import AdaRankOutcome
    from merge_service.engine import CancelCheck, PreparedMerge, ProgressCallback
    from merge_service.inputs import TaskInput
    from merge_service.spec import JobSpec

# METHODS.md section 12: defaults that depend on `base`
BASE_DEFAULTS: dict[str, dict[str, float]] = {
    "task_arithmetic": {"prior": 0.3, "initial_rank_ratio": 1.0},
    "cart": {"prior": 2.0, "initial_rank_ratio": 0.16},
}


class AdaRankParams(SvdParams):
    base: Literal["task_arithmetic", "cart"] = Field(
        "task_arithmetic",
        description="θ_b: the base model θ0 (task_arithmetic) or the weighted average θ̄ (cart)")
    prior: float = Field(0.3, description="initial λ of every task and tensor "
                                          "(default 0.3; 2.0 when base is cart)")
    initial_rank_ratio: float = Field(
        1.0, ge=0, le=1,
        description="share of each task's singular values kept at start, "
                    "floor(ratio · r_t) (default 1.0; 0.16 when base is cart)")
    steps: int = Field(500, ge=0, description="Adam steps")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(16, ge=1, description="calibration inputs per task and step")
    temperature: float = Field(10.0, gt=0, description="mask p = sigmoid(m / temperature)")

    @model_validator(mode="before")
    @classmethod
    def _base_defaults(cls, data: Any) -> Any:
        """`prior` and `initial_rank_ratio` default by `base` (cart: 2.0 and 0.16)."""
        if isinstance(data, dict):
            base = data.get("base", "task_arithmetic")
            defaults = BASE_DEFAULTS.get(base) if isinstance(base, str) else None
            if defaults is not None:
                data = {**defaults, **data}
        return data


@register
class AdaRank(WholeModelMethod[AdaRankParams]):
    name = "adarank"
    summary = ("Learn per-task singular-value masks and per-tensor coefficients by entropy "
               "minimisation on unlabeled calibration data (AdaRank).")
    Params = AdaRankParams
    output_formats = frozenset({"full"})
    # LoRA inputs are factored from their low-rank form, in full space (never core/knots).
    spaces = frozenset({"full"})

    def whole_model_problems(self, spec: JobSpec, base_path: Path | None,
                             base_tensors: dict[str, Any] | None, inputs: list[TaskInput]
                             ) -> list[Problem]:
        """Calibration data, model family, heads, tokenizer: everything `optimize` needs."""
        from merge_service.adarank.preflight import adarank_problems

        return adarank_problems(self, spec, base_path, base_tensors, inputs)

    def optimize(self, prepared: PreparedMerge, progress: ProgressCallback,
                 cancelled: CancelCheck) -> AdaRankOutcome:
        from merge_service.adarank.optimize import run_adarank

        return run_adarank(self, prepared, progress, cancelled)
