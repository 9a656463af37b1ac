"""AdaRank's optimisation loop (METHODS.md section 12, steps 1-5) over a prepared merge.

Memory: the model the forward runs holds `θ_b` (one dense copy of the model); each merged
matrix adds its tasks' factors `U_t`, `σ_t`, `V_t` over their numerical ranks (for LoRA inputs
found from `B_t`, `A_t` without forming `ΔW_t`), each other tensor its dense `X_t`.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from merge_service.adarank.calibration import CalibrationSet, calibration_problems
from merge_service.adarank.factors import (
    TensorTerms,
    dense_terms,
    hard_mask,
    initial_logits,
    low_rank_terms,
    matrix_terms,
    straight_through_mask,
)
from merge_service.adarank.models import ModelFamily, Objective, detect_family, parameter_mapping
from merge_service.errors import MergeCancelled, PreflightError
from merge_service.methods.base import TensorTask

if TYPE_CHECKING:
    from merge_service.engine import CancelCheck, PreparedMerge, ProgressCallback
    from merge_service.methods.adarank import AdaRank, AdaRankParams


@dataclass
class AdaRankOutcome:
    """The learned merge: the static tensors on demand, and the report."""

    terms: dict[str, TensorTerms]
    index: dict[str, int]  # tensor name -> row of `lam`
    lam: torch.Tensor  # N × T, final λ
    masks: dict[str, torch.Tensor]  # matrices: final hard masks (K, float 0/1)
    task_names: list[str]
    report: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> torch.Tensor:
        """`θ_b + Σ_t λ_{t,n} U_t diag(b_t σ_t) V_tᵀ` (or `θ_b + Σ_t λ_{t,n} X_t`)."""
        with torch.no_grad():
            return self.terms[name].merged(self.lam[self.index[name]], self.masks.get(name))

    def info(self, name: str) -> dict[str, Any]:
        terms = self.terms[name]
        lam = self.lam[self.index[name]].tolist()
        out: dict[str, Any] = {"action": "merged",
                               "lambda": dict(zip(self.task_names, lam, strict=True))}
        if terms.is_matrix:
            mask = self.masks.get(name)
            kept = [int(mask[s].sum()) if mask is not None else 0 for s in terms.slices()]
            out["rank"] = dict(zip(self.task_names, terms.ranks, strict=True))
            out["kept_rank"] = dict(zip(self.task_names, kept, strict=True))
        return out


def run_adarank(method: AdaRank, p: PreparedMerge, progress: ProgressCallback,
                cancelled: CancelCheck) -> AdaRankOutcome:
    params = method.params
    started = time.perf_counter()
    names = [t.name for t in p.inputs]
    sets, problems = calibration_problems(p.spec.calibration, names)
    family, _, family_problems = detect_family(p.base_source.path, p.inputs, p.base.tensors)
    if problems or family_problems or family is None:  # inputs changed since preflight
        raise PreflightError(problems + family_problems)

    objective = Objective(family, p.base_source.path, p.inputs, p.device, p.compute_dtype)
    state = objective.state()
    merged = [n for n in p.merged if n not in family.head_tensors]
    mapping = parameter_mapping(merged, set(state))
    if family.head_tensors:
        objective.head_params = _own_heads(p, family, parameter_mapping(family.head_tensors,
                                                                        set(state)))
    terms = {}
    for i, name in enumerate(p.merged):
        if cancelled():
            raise MergeCancelled(f"cancelled while factoring task vectors ({i} of "
                                 f"{len(p.merged)} tensors)")
        progress(_progress("factorizing", i, len(p.merged), name))
        target = state.get(mapping[name]) if name in mapping else None
        terms[name] = _tensor_terms(method, p, name, params.base, target)
    factor_s = time.perf_counter() - started

    # learned: λ (N × T) and the mask logits of every matrix, side by side
    index = {name: i for i, name in enumerate(p.merged)}
    lam = torch.full((len(p.merged), len(names)), params.prior, dtype=p.compute_dtype,
                     device=p.device, requires_grad=True)
    offsets, logit_parts, start = {}, [], 0
    for name, tensor_terms in terms.items():
        if tensor_terms.is_matrix:
            logit_parts.append(initial_logits(tensor_terms.ranks, params.initial_rank_ratio,
                                              dtype=p.compute_dtype, device=p.device))
            offsets[name] = slice(start, start + tensor_terms.total_rank)
            start += tensor_terms.total_rank
    logits = (torch.cat(logit_parts) if logit_parts
              else torch.zeros(0, dtype=p.compute_dtype, device=p.device)).requires_grad_()
    optimizer = torch.optim.Adam([lam, logits], lr=params.lr)

    def forward_params(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {mapping[n]: terms[n].merged(lam[index[n]], masks.get(n))
                for n in merged if n in mapping}

    batches = [_BatchSchedule(sets[n], params.batch_size, p.spec.options.seed, n) for n in names]
    entropy_initial = _calibration_entropy(objective, batches, logits, offsets, params,
                                           forward_params)
    curve: list[float] = []
    loop_started = time.perf_counter()
    for step in range(params.steps):
        if cancelled():
            raise MergeCancelled(f"cancelled after {step} of {params.steps} optimisation steps")
        progress(_progress("optimizing", step, params.steps, None))
        ste = straight_through_mask(logits, params.temperature)
        params_now = forward_params({n: ste[s] for n, s in offsets.items()})
        total = 0.0
        for t in range(len(names)):
            # one task's activations at a time; the merged weights' graph is kept for the next
            loss = objective.entropy(t, params_now, objective.tokenize(batches[t].next()))
            loss.backward(retain_graph=t < len(names) - 1)
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(total)
        del params_now, ste
    progress(_progress("optimizing", params.steps, params.steps, None))
    loop_s = time.perf_counter() - loop_started
    entropy_final = _calibration_entropy(objective, batches, logits, offsets, params,
                                         forward_params)

    lam_final = lam.detach()
    hard = hard_mask(logits.detach(), params.temperature).to(p.compute_dtype)
    masks = {n: hard[s] for n, s in offsets.items()}
    outcome = AdaRankOutcome(terms, index, lam_final, masks, names)
    kept = {n: sum(outcome.info(m)["kept_rank"][n] for m in offsets) for n in names}
    full = {n: sum(terms[m].ranks[t] for m in offsets) for t, n in enumerate(names)}
    outcome.report = {
        "family": family.describe(),
        "params": params.model_dump(mode="json"),
        "calibration": {n: {"path": str(sets[n].path), "samples": len(sets[n].texts)}
                        for n in names},
        "loss_curve": curve,
        "calibration_entropy": {"initial": entropy_initial, "final": entropy_final},
        "kept_rank_total": {n: {"kept": kept[n], "rank": full[n]} for n in names},
        "timings_s": {"factor": round(factor_s, 4), "optimize": round(loop_s, 4),
                      "per_step": round(loop_s / params.steps, 6) if params.steps else 0.0},
    }
    return outcome


def _progress(stage: str, done: int, total: int, current: str | None) -> Any:
    from merge_service.engine import Progress

    return Progress(stage, done, total, current)


def _tensor_terms(method: AdaRank, p: PreparedMerge, name: str, base_kind: str,
                  target: torch.Tensor | None) -> TensorTerms:
    """Step 1-2 for one tensor: `θ_b`, and each task's `X_t` (factored for matrices).

    `X_t = w_t (θ_t − θ_b)`: the per-model weight scales the task vector as everywhere else
    (METHODS.md section 0), so that λ = 1 with every value kept is task arithmetic.
    `target` is the model's own parameter: it is overwritten with `θ_b` and used as the base
    (no second dense copy).
    """
    theta0 = p.base.get(name).to(p.device, p.compute_dtype)
    weights = [t.weight for t in p.inputs]
    total_weight = sum(weights)
    is_2d = theta0.dim() == 2
    probe = TensorTask(name=name, task_vectors=[], weights=[], is_2d=is_2d)
    is_matrix = method.is_matrix(probe)
    low_rank = is_matrix and any(name in getattr(t.model, "modules", {}) for t in p.inputs) \
        and not any(name in getattr(t.model, "extras", {}) for t in p.inputs)

    if low_rank:
        like = torch.empty(0, device=p.device, dtype=p.compute_dtype)
        factors = [t.lora_factors(name, like) for t in p.inputs]  # (A_t, w_t s_t B_t)
        num = len(factors)
        mixing = torch.eye(num, dtype=torch.float64)
        theta_b = theta0
        if base_kind == "cart":
            # θ̄ − θ0 = Σ_s w_s ΔW_s / Σw;  X_t = w_t (ΔW_t − (θ̄ − θ0))
            mixing -= torch.tensor(weights, dtype=torch.float64)[:, None] / total_weight
            present = [f for f in factors if f is not None]
            b_stack = torch.cat([f[1] for f in present], dim=1)
            a_stack = torch.cat([f[0] for f in present], dim=0)
            theta_b = theta0 + (b_stack @ a_stack) / total_weight
        terms = low_rank_terms(name, theta_b, factors, mixing)
    else:
        parts = [t.task_vector(name, theta0) for t in p.inputs]  # τ_t = θ_t − θ0
        theta_b = theta0
        if base_kind == "cart":
            mean = torch.zeros_like(theta0)
            for tv, w in zip(parts, weights, strict=True):
                if tv is not None:
                    mean.add_(tv, alpha=w / total_weight)
            parts = [(tv if tv is not None else torch.zeros_like(theta0)) - mean
                     for tv in parts]
            theta_b = theta0 + mean
        xs = [None if x is None else (x if w == 1.0 else x * w)
              for x, w in zip(parts, weights, strict=True)]
        terms = matrix_terms(name, theta_b, xs) if is_matrix else dense_terms(name, theta_b, xs)
    if target is not None and target.shape == terms.base.shape:
        with torch.no_grad():
            target.copy_(terms.base)
        terms.base = target
    return terms


def _own_heads(p: PreparedMerge, family: ModelFamily, mapping: dict[str, str]
               ) -> list[dict[str, torch.Tensor]]:
    """Built-in heads: task t's own `classifier.*`/`score.*` tensors, `θ0 + τ_t`."""
    heads = []
    for task in p.inputs:
        own = {}
        for name in family.head_tensors:
            theta0 = p.base.get(name).to(p.device, p.compute_dtype)
            tv = task.task_vector(name, theta0)
            own[mapping[name]] = theta0 if tv is None else theta0 + tv
        heads.append(own)
    return heads


class _BatchSchedule:
    """Batches of one task's texts: a fresh permutation per pass, from a CPU generator seeded by
    (options.seed, task name), so batches are the same on every run and device."""

    def __init__(self, data: CalibrationSet, batch_size: int, seed: int, task: str) -> None:
        self.task = task
        self.texts = data.texts
        self.size = min(batch_size, len(self.texts))
        self.generator = torch.Generator().manual_seed(
            (seed * 1_000_003 + zlib.crc32(task.encode())) % 2**63)
        self.order: list[int] = []

    def next(self) -> list[str]:
        if len(self.order) < self.size:
            self.order += torch.randperm(len(self.texts), generator=self.generator).tolist()
        batch, self.order = self.order[:self.size], self.order[self.size:]
        return [self.texts[i] for i in batch]

    def all(self) -> list[list[str]]:
        return [self.texts[i:i + self.size] for i in range(0, len(self.texts), self.size)]


def _calibration_entropy(objective: Objective, batches: Sequence[_BatchSchedule],
                         logits: torch.Tensor, offsets: dict[str, slice],
                         params: AdaRankParams, forward_params: Any) -> dict[str, float]:
    """Each task's mean entropy over its whole calibration set, with the hard masks and the
    current λ (no gradient): the loss before and after the optimisation, for the report."""
    out = {}
    with torch.no_grad():
        hard = hard_mask(logits, params.temperature).to(logits.dtype)
        weights = forward_params({n: hard[s] for n, s in offsets.items()})
        for t, schedule in enumerate(batches):
            total, count = 0.0, 0
            for texts in schedule.all():
                total += float(objective.entropy(t, weights, objective.tokenize(texts))) \
                    * len(texts)
                count += len(texts)
            out[schedule.task] = total / count
    return out
