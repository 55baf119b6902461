"""Load a base model from a local path (diffusers folder or single .safetensors file), add LoRA.

Only local paths: a missing folder fails here with its path, instead of diffusers treating it as a
hub id and failing with a confusing LocalEntryNotFoundError.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .fingerprint import tree_digest

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_model_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path if it is a usable local model, else raise naming what's missing."""
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


# What a config folder for a single-file checkpoint must hold (no weights needed).
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer",
)


def check_config_folder(checkpoint: str | os.PathLike, config: str | os.PathLike | None) -> Path:
    """The diffusers folder that describes a single-file ``checkpoint``, checked; else raise.

    A single file holds weights only: the component configs, the tokenizer and the scheduler come
    from a local diffusers folder (weights there are not needed and not read). Without one,
    diffusers would fetch them from the hub even with ``local_files_only=True``.
    """
    if not config:
        raise ValueError(
            f"{checkpoint}: a single-file checkpoint needs `original_config`: a local diffusers "
            "folder with its configs and tokenizer (e.g. the model's hub folder without weights)"
        )
    c = Path(config)
    if not c.is_dir():
        raise FileNotFoundError(
            f"original_config of {checkpoint}: not a folder: {c} (expected a local diffusers "
            "folder with model_index.json, component configs and tokenizer; an LDM .yaml cannot be "
            "loaded offline)"
        )
    missing = [f for f in CONFIG_FILES if not (c / f).exists()]
    if missing:
        raise FileNotFoundError(f"original_config of {checkpoint}: {c} lacks {missing}")
    return c


def copy_configs(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a diffusers folder without its weights: the `original_config` of a single file."""
    import shutil

    src, out = Path(model_dir), Path(out_dir)
    for f in sorted(src.rglob("*")):
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".ckpt", ".pt", ".gguf"):
            (out / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / f.relative_to(src))
    return out


def load_parts(path: str | os.PathLike, parts=PARTS, original_config: str | None = None) -> dict:
    """Load the named components of a base model, offline and memory-mapped.

    Args:
        path: a diffusers folder, or a single-file ``.safetensors`` checkpoint in the original
            LDM/CompVis key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
            ``cond_stage_model.transformer.*``), e.g. ``v1-5-pruned.safetensors``.
        parts: which of unet, vae, text_encoder, tokenizer, scheduler to load.
        original_config: for a single file (required then): a local diffusers folder whose
            configs, tokenizer and scheduler describe it; its weights, if any, are not read.

    Both go through diffusers' own loaders: ``from_pretrained`` per component for a folder,
    ``StableDiffusionPipeline.from_single_file(..., config=<folder>, local_files_only=True)`` for a
    file (which converts the LDM keys; components not in ``parts`` are not built).

    Memory mapping (diffusers 0.42 / transformers 5 / safetensors 0.8, read in their source):
    ``ModelMixin.from_pretrained`` and ``load_single_file_checkpoint`` read ``.safetensors`` with
    ``safetensors.torch.load_file``, whose default backend is ``"mmap"``, unless
    ``disable_mmap=True`` is passed (lorapipe never does). With accelerate installed,
    ``low_cpu_mem_usage`` defaults to True: the model is built on the meta device and filled from
    the mapped tensors instead of being initialised and then overwritten. transformers'
    ``from_pretrained`` (the CLIP text encoder) opens safetensors with ``safe_open`` (mmap) too,
    except on an HF mount.
    """
    p = check_model_path(path)
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        raise ValueError(f"unknown model part(s) {unknown} (have: {', '.join(PARTS)})")
    if p.is_dir():
        return {part: _load_folder_part(p, part) for part in parts}
    cfg = check_config_folder(p, original_config)
    out = {}
    weights = [k for k in parts if k in WEIGHT_PARTS]
    if weights:
        pipe = _single_file_pipeline(p, cfg, skip=[k for k in PARTS if k not in weights])
        out = {k: getattr(pipe, k) for k in weights}
    # tokenizer and scheduler are not in the file: the same loaders as for a folder
    out.update({k: _load_folder_part(cfg, k) for k in parts if k not in WEIGHT_PARTS})
    return {k: out[k] for k in parts}


WEIGHT_PARTS = ("unet", "vae", "text_encoder")


def _load_folder_part(folder: Path, part: str):
    if part == "unet":
        from diffusers import UNet2DConditionModel as cls
    elif part == "vae":
        from diffusers import AutoencoderKL as cls
    elif part == "text_encoder":
        from transformers import CLIPTextModel as cls
    elif part == "tokenizer":
        from transformers import CLIPTokenizer as cls
    else:  # training wants the DDPM forward process whatever sampler the folder names
        from diffusers import DDPMScheduler as cls
    return cls.from_pretrained(str(folder), subfolder=part, local_files_only=True)


def _single_file_pipeline(p: Path, cfg: Path, skip=()):
    """``from_single_file`` with every config from the local folder ``cfg``: no hub access.

    Components named in ``skip`` are passed as None, so they are neither read nor converted.
    """
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(
        str(p),
        config=str(cfg),
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **{k: None for k in skip},
    )


def load_pipeline(path: str | os.PathLike, original_config: str | None = None):
    """A StableDiffusionPipeline (sampler from the model's own config) for a folder or a file."""
    p = check_model_path(path)
    if p.is_file():
        return _single_file_pipeline(p, check_config_folder(p, original_config))
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(p), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )


def part_fingerprint(path: str | os.PathLike, part: str | None = None) -> str:
    """sha256 over a model's (or one component's) files; see `fingerprint.tree_digest`."""
    return tree_digest(path, part)


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


# CLIP text-encoder modules that get a LoRA when the text encoder is trained (kohya's SD-1.x set)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None):
    """Text-encoder outputs (N, L, D) of ``prompts``: padded to the tokenizer's max length,
    truncated. The latent cache and text-encoder training both encode through here, so a trained
    text encoder sees its prompts exactly as the cache would have stored them."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    return text_encoder(ids.to(device) if device is not None else ids)[0]


def adapter_metadata(cfg) -> dict:
    """LoraConfig as JSON-stable metadata (sets sorted, so bytes are the same in every process)."""
    d = cfg.to_dict()
    return {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in d.items()}


def metadata_json(d: dict) -> str:
    return json.dumps(d, sort_keys=True)
