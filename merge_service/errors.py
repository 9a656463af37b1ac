"""Exceptions raised by the library: one type per user-facing failure.

`InvalidInputError` and its subclasses are the user's to fix (CLI exit code 1); everything else
derived from `MergeServiceError` is a runtime failure (exit code 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from merge_service.spec import JobSpec


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job: where it is and what was expected."""

    message: str
    model: str | None = None  # the source (or "base", "output", "method") the problem is about
    tensor: str | None = None
    field: str | None = None  # dotted path into the spec, e.g. "method.params.density"
    # other spec fields the problem is about (not shown): where one of them is left out of a
    # partial spec, the problem is about its default
    also: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __str__(self) -> str:
        where = [part for part in (self.field, self.model, self.tensor) if part]
        return f"{' / '.join(where)}: {self.message}" if where else self.message

    def to_dict(self) -> dict[str, str | None]:
        return {"message": self.message, "model": self.model, "tensor": self.tensor,
                "field": self.field}


def capped(problems: list[Problem], label: str, limit: int = 20) -> list[Problem]:
    """At most `limit` problems of one kind, then one line counting the rest: a broken file
    of a thousand tensors is one message to act on, not a thousand."""
    if len(problems) <= limit:
        return problems
    return [*problems[:limit], Problem(f"... and {len(problems) - limit} more problems",
                                       model=label)]


def within(field: str | None, fields: list[str]) -> bool:
    """Whether the dotted spec path `field` is one of `fields` or lies inside one."""
    return field is not None and any(field == f or field.startswith(f + ".") for f in fields)


class MergeServiceError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidInputError(MergeServiceError):
    """The spec or its inputs are wrong; nothing was written."""

    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = Problem(problems)
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__(self._summary())

    def _summary(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class SpecError(InvalidInputError):
    """The job spec does not parse or does not match the schema.

    `partial`: the spec less its unknown fields and invalid values, when that much is a valid
    spec (the invalid values then take their defaults), so that preflight can still report
    the problems of the rest: every problem at once, not one typo at a time. `replaced`: the
    dotted fields left out of it; preflight's word on them would be about their defaults."""

    def __init__(self, problems: list[Problem] | Problem | str,
                 partial: JobSpec | None = None, replaced: list[str] | None = None) -> None:
        super().__init__(problems)
        self.partial = partial
        self.replaced = replaced or []

    def with_problems_of_partial(self, preflight_problems: list[Problem]) -> SpecError:
        """This error with what preflight found in `partial` added: duplicates and problems
        of the fields left out of it are not."""
        extra = [p for p in preflight_problems if p not in self.problems and not any(
            within(f, self.replaced) for f in (p.field, *p.also))]
        return SpecError(self.problems + extra) if extra else self


class PreflightError(InvalidInputError):
    """The spec parses but its inputs, method or output cannot work together."""


class CorruptTensorError(InvalidInputError):
    """A tensor read during the merge holds NaN/Inf or could not be decoded."""


class NonFiniteResultError(InvalidInputError):
    """A merged tensor overflowed to Inf or NaN: the weights, alpha or adapter scales are too
    large for the compute or output dtype. Nothing was written."""


class MergeCancelled(MergeServiceError):
    """The cancel check returned true; the merge stopped and left no output."""


class MergeRuntimeError(MergeServiceError):
    """The merge failed for a reason that is not the input's fault (I/O, device, numerics)."""


class HubPushError(MergeRuntimeError):
    """The merged output could not be pushed to its Hub destination; the repo is unchanged."""
