"""Local output directories, written atomically: a temporary sibling renamed at the end."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from merge_service.errors import Problem
from merge_service.sources.resolve import WEIGHT_SUFFIXES

# Files of the base that describe the model but are not weights; our card replaces README.md.
_SKIP_NAMES = {"README.md", ".gitattributes"}


def destination_problems(destination: Path, overwrite: bool) -> list[Problem]:
    """Can the output be written there? Checked at preflight, before any heavy work."""
    if destination.exists() and not overwrite:
        return [Problem(f"destination {destination} already exists (use --overwrite to "
                        "replace it)", field="output.destination")]
    if destination.exists() and not destination.is_dir():
        return [Problem(f"destination {destination} is a file", field="output.destination")]
    parent = destination.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [Problem(f"cannot create {destination}: {parent} is not writable",
                        field="output.destination")]
    return []


class LocalDirectorySink:
    """`with LocalDirectorySink(dest, overwrite) as tmp:` write into tmp; on success `commit()`.

    Leaving the block without commit (error, cancel) removes everything that was written.
    """

    def __init__(self, destination: Path, overwrite: bool = False) -> None:
        self.destination = destination
        self.overwrite = overwrite
        self.tmp = destination.parent / f".{destination.name}.partial-{uuid.uuid4().hex[:8]}"
        self._committed = False

    def __enter__(self) -> Path:
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> None:
        old = None
        if self.destination.exists():
            if not self.overwrite:
                raise FileExistsError(f"destination {self.destination} appeared while merging")
            old = self.destination.parent / f".{self.destination.name}.old-{uuid.uuid4().hex[:8]}"
            self.destination.rename(old)
        self.tmp.rename(self.destination)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def copy_model_files(source: Path, target: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files of the base (subfolders included)."""
    copied = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if (not path.is_file() or path.suffix in WEIGHT_SUFFIXES or path.name in _SKIP_NAMES
                or any(part.startswith(".") for part in rel.parts)
                or path.name.endswith(".index.json")):
            continue
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / rel)
        copied.append(str(rel))
    return copied
