"""The interface every model family implements (see the package docstring)."""

from __future__ import annotations

import os
from pathlib import Path


class Family:
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: str = ""  # short, stable: recorded in config.yaml and file metadata
    title: str = ""  # for people: "SD-1.x/2.x"
    parts: tuple[str, ...] = ()  # components of a base model, in load order
    weight_parts: tuple[str, ...] = ()  # the parts with weights (a single file holds these)
    text_parts: tuple[str, ...] = ()  # what encoding prompts needs
    latent_parts: tuple[str, ...] = ()  # what the latent stage loads (VAE + text parts)
    config_files: tuple[str, ...] = ()  # what a single file's `original_config` folder must hold
    text_lora_targets: tuple[str, ...] = ()  # text-encoder modules that get a LoRA
    tiny_files: dict[str, tuple[str, ...]] = {}  # the files `build_tiny` writes, per part
    # kohya's key prefix of each component with a LoRA (``lora_unet_``, ``lora_te_``, ...)
    kohya_prefixes: dict[str, str] = {}
    base_version_prefix: str = ""  # how its kohya ``ss_base_model_version`` values start

    def matches(self, model_index: dict, unet_config: dict) -> bool:
        """Whether a model with this ``model_index.json`` and UNet config is of this family."""
        raise NotImplementedError

    def training_parts(self, need_text: bool) -> tuple[str, ...]:
        """Parts the train stage loads; the text parts only when prompts are encoded there."""
        return ("unet", "scheduler", "vae", *(self.text_parts if need_text else ()))

    def part_class(self, part: str):
        """The diffusers/transformers class that loads ``part`` (imported on call)."""
        raise NotImplementedError

    def pipeline_class(self):
        """The diffusers pipeline that samples this family."""
        raise NotImplementedError

    def text_encoders(self, parts: dict) -> list:
        """The text encoder modules among loaded ``parts`` (LoRA targets when trained)."""
        raise NotImplementedError

    def encode_prompts(self, parts: dict, prompts: list[str], device=None) -> dict:
        """What the latent cache stores per caption, and what training conditions the UNet on:
        ``{name: (N, ...) tensor}`` computed from ``prompts`` with the loaded text parts. Every
        family has ``"text"`` (the UNet's encoder hidden states); others add their own."""
        raise NotImplementedError

    def added_cond(self, cond: dict, metas: list[dict], device) -> dict | None:
        """The UNet's ``added_cond_kwargs`` for a batch (``cond``: the stacked outputs of
        `encode_prompts`; ``metas``: the samples' metadata), or None when it takes none."""
        return None

    def build_tiny(self, out_dir: str | os.PathLike, seed: int = 0) -> Path:
        """A tiny model of this family's shape, from code, seeded (tests and the demo)."""
        raise NotImplementedError

    def architecture(self, unet_config: dict, scheduler_config: dict) -> dict[str, str]:
        """Architecture metadata of exported files (kohya ``ss_*`` and ``modelspec.*``), from
        the base model's UNet and scheduler configs (dicts)."""
        raise NotImplementedError

    def kohya_unet_module(self, module: str, unet_config: dict) -> str:
        """kohya's module path (dotted, before `kohya_prefixes`) of the diffusers UNet module
        ``module``; the diffusers path itself unless the family's tools name them otherwise."""
        return module
