"""Load a base model from a local path (diffusers folder or single .safetensors file), add LoRA.

Only local paths: a missing folder fails here with its path, instead of diffusers treating it as a
hub id and failing with a confusing LocalEntryNotFoundError.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_model_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path if it is a usable local model, else raise naming what is missing."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"base model not found: {p} (lorapipe loads local paths only)")
    if p.is_dir():
        missing = [c for c in PARTS if not (p / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{p}: not a complete diffusers folder (missing {missing})")
    elif p.suffix != ".safetensors":
        raise ValueError(f"{p}: expected a diffusers folder or a single-file .safetensors")
    return p


def load_parts(path: str | os.PathLike, parts=PARTS, original_config: str | None = None) -> dict:
    """Load the named components of a base model, offline, memory-mapped where diffusers can.

    Args:
        path: a diffusers folder, or a single-file ``.safetensors`` checkpoint (then
            ``original_config`` may name a local diffusers folder whose configs describe it).
        parts: which of unet, vae, text_encoder, tokenizer, scheduler to load.
    """
    p = check_model_path(path)
    if p.is_file():
        from diffusers import StableDiffusionPipeline

        kw = {"config": original_config} if original_config else {}
        pipe = StableDiffusionPipeline.from_single_file(
            str(p), local_files_only=True, safety_checker=None, **kw
        )
        return {k: getattr(pipe, k) for k in parts}
    out = {}
    for part in parts:
        if part == "unet":
            from diffusers import UNet2DConditionModel as cls
        elif part == "vae":
            from diffusers import AutoencoderKL as cls
        elif part == "text_encoder":
            from transformers import CLIPTextModel as cls
        elif part == "tokenizer":
            from transformers import CLIPTokenizer as cls
        else:
            from diffusers import DDPMScheduler as cls
        out[part] = cls.from_pretrained(str(p), subfolder=part, local_files_only=True)
    return out


def part_fingerprint(path: str | os.PathLike, part: str | None = None) -> str:
    """sha256 over a model's (or one component's) files: names, sizes and contents."""
    p = Path(path)
    if p.is_file():
        files = [p]
    else:
        base = p / part if part else p
        files = sorted(f for f in base.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(p.parent if p.is_file() else p).as_posix().encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def vae_scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", 0.18215))


def lora_config(rank: int, alpha: float, targets, dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


def adapter_metadata(cfg) -> dict:
    """LoraConfig as JSON-stable metadata (sets sorted, so bytes are the same in every process)."""
    d = cfg.to_dict()
    return {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in d.items()}


def metadata_json(d: dict) -> str:
    return json.dumps(d, sort_keys=True)
