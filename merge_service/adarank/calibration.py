"""Calibration data (DESIGN.md section 2, `calibration`): unlabeled inputs per task.

One JSONL file per task name: one JSON object per line, the text under `field` (default
`text`). The first `max_samples` records are used; blank lines are skipped. Labels, if the
file has any, are never read (METHODS.md section 12).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merge_service.errors import Problem
from merge_service.spec import CalibrationSource

_SHOWN = 3  # bad lines named in one problem before "and N more"


@dataclass(frozen=True)
class CalibrationSet:
    task: str
    path: Path
    texts: list[str]


def read_calibration(task: str, source: CalibrationSource
                     ) -> tuple[CalibrationSet | None, list[Problem]]:
    """The first `max_samples` texts of one task's JSONL file, or the problems that prevent it."""
    where = f"calibration.{task}"
    path = Path(source.path).expanduser()
    if not path.is_file():
        what = "is a directory, expected a JSONL file" if path.is_dir() else "does not exist"
        return None, [Problem(f"calibration file {path} {what}", field=where)]
    texts: list[str] = []
    not_json: list[int] = []
    no_field: list[int] = []
    not_text: list[int] = []
    records = 0
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                if records == source.max_samples:
                    break
                records += 1
                try:
                    record = json.loads(line)
                except ValueError:
                    not_json.append(number)
                    continue
                if not isinstance(record, dict) or source.field not in record:
                    no_field.append(number)
                elif not isinstance(record[source.field], str) or not record[source.field]:
                    not_text.append(number)
                else:
                    texts.append(record[source.field])
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(f"cannot read calibration file {path}: {exc}", field=where)]
    problems = []
    for numbers, what in ((not_json, "is not valid JSON"),
                          (no_field, f"has no field {source.field!r}"),
                          (not_text, f"field {source.field!r} is not a non-empty string")):
        if numbers:
            problems.append(Problem(f"{path}: {_lines(numbers)} {what}", field=where))
    if not problems and not texts:
        problems.append(Problem(f"calibration file {path} is empty (no JSON lines)", field=where))
    if problems:
        return None, problems
    return CalibrationSet(task, path, texts), []


def calibration_problems(calibration: dict[str, CalibrationSource] | None, tasks: list[str]
                         ) -> tuple[dict[str, CalibrationSet], list[Problem]]:
    """One readable, non-empty entry per task, none for an unknown task."""
    if not calibration:
        return {}, [Problem("adarank needs calibration data: one JSONL file of unlabeled inputs "
                            f"per task ({', '.join(tasks)})", field="calibration")]
    sets: dict[str, CalibrationSet] = {}
    problems = []
    for name in calibration:
        if name not in tasks:
            problems.append(Problem(f"calibration data for {name!r}, which is not a task of "
                                    f"this merge (tasks: {', '.join(tasks)})",
                                    field=f"calibration.{name}"))
    for name in tasks:
        source = calibration.get(name)
        if source is None:
            problems.append(Problem(f"task {name!r} has no calibration data", field="calibration",
                                    model=name))
            continue
        found, read_problems = read_calibration(name, source)
        problems += read_problems
        if found is not None:
            sets[name] = found
    return sets, problems


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_SHOWN])
    more = f" and {len(numbers) - _SHOWN} more" if len(numbers) > _SHOWN else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"
