"""The `README.md` model card written beside every output."""

from __future__ import annotations

import yaml


def render_model_card(*, title: str, base_model: str, relation: str, method: str,
                      params: dict, inputs: list[dict], output_format: str,
                      notes: str = "") -> str:
    """`inputs`: dicts with `name`, `source` (pinned), `weight`; `notes`: a paragraph of
    markdown added after the parameters (how to use an artifact)."""
    front = {
        "base_model": base_model,
        "base_model_relation": relation,
        "library_name": "peft" if relation == "adapter" else "transformers",
        "tags": ["merge", "merge-service", method],
    }
    rows = "\n".join(f"| {i['name']} | `{i['source']}` | {i['weight']:g} |" for i in inputs)
    params_text = yaml.safe_dump(params, sort_keys=True).strip() if params else "{}"
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {title}\n\n"
        f"Made with merge-service by merging {len(inputs)} models into "
        f"`{base_model}` with the `{method}` method (output format `{output_format}`).\n\n"
        f"## Inputs\n\n| task | source (pinned) | weight |\n| --- | --- | --- |\n{rows}\n\n"
        f"## Method parameters\n\n```yaml\n{params_text}\n```\n\n"
        + (f"{notes.strip()}\n\n" if notes.strip() else "")
        + "The exact job spec is in `merge_spec.yaml`; per-tensor diagnostics, timings and peak "
        "memory are in `merge_report.json`.\n"
    )
