"""The `README.md` model card written beside every output."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def render_model_card(*, title: str, base_model: str | None, base: str, relation: str,
                      library: str | None, method: str, params: dict, inputs: list[dict],
                      output_format: str, notes: str = "") -> str:
    """`base_model`: the base's Hub id for the front matter (None: not known; the Hub refuses
    a local path there); `base`: the base as the text names it (pinned id, or local path);
    `inputs`: dicts with `name`, `source` (pinned), `weight`; `notes`: a paragraph of
    markdown added after the parameters (how to use an artifact)."""
    front = {
        **({"base_model": base_model} if base_model else {}),
        "base_model_relation": relation,
        **({"library_name": library} if library else {}),
        "tags": ["merge", "merge-service", method],
    }
    rows = "\n".join(f"| {i['name']} | `{i['source']}` | {i['weight']:g} |" for i in inputs)
    params_text = yaml.safe_dump(params, sort_keys=True).strip() if params else "{}"
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {title}\n\n"
        f"Made with merge-service by merging {len(inputs)} models into "
        f"`{base}` with the `{method}` method (output format `{output_format}`).\n\n"
        f"## Inputs\n\n| task | source (pinned) | weight |\n| --- | --- | --- |\n{rows}\n\n"
        f"## Method parameters\n\n```yaml\n{params_text}\n```\n\n"
        + (f"{notes.strip()}\n\n" if notes.strip() else "")
        + "The exact job spec is in `merge_spec.yaml`; per-tensor diagnostics, timings and peak "
        "memory are in `merge_report.json`.\n"
    )


def hub_model_id(repo_id: str | None, local: Path | None,
                 claimed: Iterable[str | None] = ()
                 ) -> str | None:
    """The base as the Hub knows it: its repo id; for a local copy, the first `org/name` among
    `claimed` (what the adapters name as their base) and its `config.json`'s `_name_or_path`
    (as `save_pretrained` writes it) that agrees with the copy's model card title; None if
    none does.

    A `_name_or_path` alone is not proof: all-MiniLM-L6-v2's config names the model it was
    trained from (`nreimers/MiniLM-L6-H384-uncased`), and its card's `# all-MiniLM-L6-v2`
    says which model it is. A copy without such a title is taken at its config's word."""
    if repo_id:
        return repo_id
    if local is None:
        return None
    try:
        name = json.loads((local / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    title = model_card_title(local / "README.md")
    for candidate in [*claimed, name]:
        if not isinstance(candidate, str) or not _HUB_ID.fullmatch(candidate) \
                or Path(candidate).exists():
            continue
        if title is None or candidate.rsplit("/", 1)[-1] == title:
            return candidate
    return None


def model_card_title(card: Path) -> str | None:
    """The repo name a local copy of a Hub model gives in its model card (`# all-MiniLM-L6-v2`
    after the YAML front matter), so that adapters naming the Hub id match a local base."""
    try:
        with card.open(encoding="utf-8", errors="replace") as f:
            text = f.read(65536)
    except OSError:
        return None
    if text.startswith("---"):
        end = text.find("\n---", 3)
        text = text[end + 4:] if end >= 0 else ""
    for line in text.splitlines():
        if line.strip():
            title = line.strip()[2:].strip() if line.startswith("# ") else ""
            return title if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", title) else None
    return None


def card_base_model(card: Path) -> str | None:
    """The `base_model` of a model card's front matter (an artifact's own card), if any."""
    try:
        text = card.read_text(encoding="utf-8", errors="replace")
        front = yaml.safe_load(text.split("---\n", 2)[1]) if text.startswith("---\n") else None
    except (OSError, IndexError, yaml.YAMLError):
        return None
    name = front.get("base_model") if isinstance(front, dict) else None
    return name if isinstance(name, str) else None
