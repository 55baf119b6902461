"""Model families: everything that differs between SD-1.x/2.x, SDXL, ... behind one interface.

A family says which parts a base model has and how each is loaded, how prompts are encoded
(what the latent cache stores per caption), which pipeline samples it, which modules of its text
encoder get a LoRA, how a tiny model of its shape is built from code, and what the exported
files say about the architecture. Code outside this package asks the family; it never tests which
family a model is.

The family is recognised from the model itself (`family_of`: the pipeline class in
``model_index.json``, else the UNet config), never from a flag a user could get wrong.
Importing this package is cheap (stdlib only): the planner uses it for model file lists.

Adding a family: a module here with a `Family` subclass, and one line in `FAMILIES`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import Family
from .sd import SD
from .sdxl import SDXL

FAMILIES: tuple[Family, ...] = (SD(), SDXL())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def family_of(path: str | os.PathLike, original_config: str | os.PathLike | None = None) -> Family:
    """The family of the base model at ``path`` (a diffusers folder, or a single file described
    by the diffusers folder ``original_config``); ValueError naming the model when none fits."""
    p = Path(path)
    folder = Path(original_config) if p.suffix == ".safetensors" and original_config else p
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    for family in FAMILIES:
        if family.matches(index, unet):
            return family
    what = index.get("_class_name") or unet.get("_class_name") or "no model_index.json"
    names = ", ".join(f.title for f in FAMILIES)
    raise ValueError(f"{p}: a {what} model; lorapipe trains {names} models")


def family_of_unet(unet_config: dict | None) -> Family | None:
    """The family of a UNet config alone (an export that has no model folder); None when empty
    or of no family: nothing is guessed."""
    for family in FAMILIES if unet_config else ():
        if family.matches({}, unet_config):
            return family
    return None


def family_named(name: str) -> Family:
    """The family called ``name`` (as `Family.name` spells it)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r} (have: {[f.name for f in FAMILIES]})")


__all__ = ["FAMILIES", "SD", "SDXL", "Family", "family_named", "family_of", "family_of_unet"]
