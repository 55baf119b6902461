"""Render config/README.md from schemas/config.schema.yaml (the single source of keys and defaults).

python tools/config_doc.py          # rewrite config/README.md
python tools/config_doc.py --check  # exit 1 if it is out of date (tests run this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HEAD = """# Configuration reference

Generated from `schemas/config.schema.yaml` by `python tools/config_doc.py`; do not edit by hand.
A run's setting comes from, in order of precedence: the run's own block, the `defaults:` block,
then the default below. Unknown keys are errors, named with their path.

"""
SECTIONS = [
    ("mlflow", "Top level `mlflow:`", ("properties", "mlflow")),
    ("datasets.NAME", "A dataset: `datasets: {NAME: {...}}`", ("$defs", "dataset")),
    ("base_models.NAME", "A base model: `base_models: {NAME: {...}}`", ("$defs", "base_model")),
    (
        "runs.NAME / defaults",
        "Run settings: `runs: {NAME: {...}}` and `defaults: {...}`",
        ("$defs", "run_settings"),
    ),
    (
        "sweeps.NAME",
        "A sweep: `sweeps: {NAME: {...}}`",
        ("properties", "sweeps", "additionalProperties"),
    ),
]


def _type(spec: dict) -> str:
    if "enum" in spec:
        return " \\| ".join(json.dumps(v) for v in spec["enum"])
    if "$ref" in spec:
        return spec["$ref"].rsplit("/", 1)[-1]
    t = spec.get("type", "")
    return " \\| ".join(t) if isinstance(t, list) else t


def _default(spec: dict) -> str:
    if "default" not in spec:
        return "(required)" if spec.get("_required") else "—"
    return f"`{json.dumps(spec['default'])}`"


def _top_level_switches(schema: dict) -> dict:
    """Top-level keys that are plain values (not blocks such as mlflow: or runs:)."""
    props = schema["properties"].items()
    return {"properties": {k: v for k, v in props if v.get("type") not in ("object", None)}}


def render() -> str:
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    out = [HEAD]
    sections = [*SECTIONS, ("", "Other top-level keys", None)]
    for _prefix, title, path in sections:
        node = schema if path else _top_level_switches(schema)
        for p in path or ():
            node = node[p]
        if not node.get("properties"):
            continue
        out.append(f"## {title}\n\n| key | type | default | meaning |\n|---|---|---|---|\n")
        required = set(node.get("required", []))
        for key, spec in node.get("properties", {}).items():
            spec = {**spec, "_required": key in required}
            desc = " ".join(str(spec.get("description", "")).split())
            if "properties" in spec:
                subs = ", ".join(
                    f"`{k}` (default `{json.dumps(v.get('default'))}`)"
                    for k, v in spec["properties"].items()
                )
                desc = f"{desc} Keys: {subs}".strip()
            out.append(f"| `{key}` | {_type(spec)} | {_default(spec)} | {desc} |\n")
        out.append("\n")
    return "".join(out)


def main() -> int:
    target = REPO / "config" / "README.md"
    text = render()
    if "--check" in sys.argv:
        if not target.exists() or target.read_text() != text:
            print("config/README.md is out of date: run python tools/config_doc.py")
            return 1
        return 0
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
