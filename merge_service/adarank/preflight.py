"""AdaRank's preflight: every problem with its calibration data and model, found at once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_service.adarank.calibration import calibration_problems
from merge_service.adarank.models import detect_family, model_keys, parameter_mapping
from merge_service.errors import Problem
from merge_service.inputs import TaskInput
from merge_service.preflight import weight_fields
from merge_service.spec import JobSpec

if TYPE_CHECKING:
    from merge_service.methods.adarank import AdaRank

_SHOWN = 5


def adarank_problems(method: AdaRank, spec: JobSpec, base_path: Path | None,
                     base_tensors: dict[str, Any] | None, inputs: list[TaskInput]
                     ) -> list[Problem]:
    problems: list[Problem] = []
    _, calibration = calibration_problems(spec.calibration, spec.task_names())
    problems += calibration
    if method.params.base == "cart" and sum(m.weight for m in spec.models) == 0:
        problems.append(Problem("adarank with base cart divides by the sum of the weights, "
                                "which is 0", field="models", also=weight_fields(spec)))
    if base_path is None or base_tensors is None or len(inputs) != len(spec.models):
        return problems  # the sources' own problems are reported by the engine
    family, config, family_problems = detect_family(base_path, inputs, base_tensors)
    problems += family_problems
    if family is None:
        return problems
    problems += _tokenizer_problems(base_path)
    try:
        keys = model_keys(family, config)
    except Exception as exc:  # transformers raises many types for a config it cannot build
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problems.append(Problem(f"unsupported architecture: transformers cannot build "
                                f"{family.auto_class} from the base's config ({reason})",
                                model="base"))
        return problems
    touched = [n for n, info in base_tensors.items()
               if info.is_float and any(t.touches(n) for t in inputs)
               and n not in family.head_tensors]
    mapping = parameter_mapping(touched, keys)
    unplaced = [n for n in touched if n not in mapping]
    if unplaced:
        shown = ", ".join(unplaced[:_SHOWN])
        more = f" and {len(unplaced) - _SHOWN} more" if len(unplaced) > _SHOWN else ""
        problems.append(Problem(
            f"unsupported architecture: {len(unplaced)} tensors the task models change have no "
            f"parameter in the {family.auto_class} model adarank runs ({shown}{more})",
            model="base"))
    return problems


def _tokenizer_problems(base_path: Path) -> list[Problem]:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(base_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [Problem(f"adarank tokenizes the calibration data with the base's tokenizer, "
                        f"which cannot be loaded from {base_path} ({reason})", model="base")]
    return []
