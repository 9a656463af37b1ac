"""Directories kept for reuse (header copies of Hub weights, schedules' copies of local
adapters): each is touched (`os.utime`) when it is used again, and removed once unused for a
while, so that a long-running service's `DATA_DIR` does not grow without end."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path


def prune_unused(entries: Iterable[Path], keep_s: float) -> list[Path]:
    """Remove the directories among `entries` not modified or touched for `keep_s` seconds;
    returns those removed."""
    cutoff = time.time() - keep_s
    removed = []
    for entry in entries:
        try:
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry)
                removed.append(entry)
        except OSError:  # removed by another process meanwhile, or not ours to remove
            continue
    return removed
