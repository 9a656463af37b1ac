"""Tensor names saved from one model class, read as another's."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable


def prefix_change(names: Iterable[str], targets: Collection[str]) -> Callable[[str], str]:
    """The one prefix change that places the most `names` among `targets`: none, strip a
    leading component, or add one. A model saved from `BertForSequenceClassification` names its
    tensors `bert.encoder…` where `BertModel` has `encoder…`, and adapters are saved relative to
    the class they were trained on.

    Ties go to the first candidate in a fixed order (none, strips, adds; prefixes sorted), so
    the choice does not depend on string hashing.
    """
    names = list(names)

    def placed(fn: Callable[[str], str]) -> int:
        return sum(fn(n) in targets for n in names)

    def strip(prefix: str) -> Callable[[str], str]:
        return lambda n: n.removeprefix(prefix + ".")

    def add(prefix: str) -> Callable[[str], str]:
        return lambda n: f"{prefix}.{n}"

    candidates: list[Callable[[str], str]] = [lambda n: n]
    candidates += [strip(p) for p in sorted({n.split(".", 1)[0] for n in names if "." in n})]
    candidates += [add(p) for p in sorted({k.split(".", 1)[0] for k in targets if "." in k})]
    return max(candidates, key=placed)  # max keeps the first of equals
