"""The `README.md` model card written beside every output."""

from __future__ import annotations

import json
import re
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


def hub_model_id(repo_id: str | None, local: Path | None) -> str | None:
    """The base as the Hub knows it: its repo id, or for a local copy the `org/name` its
    `config.json` names (`_name_or_path`, as `save_pretrained` writes it); None if neither."""
    if repo_id:
        return repo_id
    try:
        name = json.loads((local / "config.json").read_text()).get("_name_or_path") \
            if local is not None else None
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(name, str) and _HUB_ID.fullmatch(name) and not Path(name).exists():
        return name
    return None
