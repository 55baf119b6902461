"""Load a base model from a local path (diffusers folder or single .safetensors file), add LoRA.

Only local paths: a missing folder fails here with its path, instead of diffusers treating it as a
hub id and failing with a confusing LocalEntryNotFoundError.
"""

from __future__ import annotations

import os
from pathlib import Path

from .families import Family, family_of
from .fingerprint import tree_digest
from .jobtime import phase


class _Unrecognised:
    """What any diffusers pipeline folder has, for a model no family recognises (yet)."""

    parts = ("unet", "scheduler")
    config_files = ("model_index.json", "unet/config.json")


def _family_or_none(path, original_config=None):
    try:
        return family_of(path, original_config)
    except ValueError:
        return _Unrecognised


def model_parts_of(path: str | os.PathLike) -> tuple[str, ...]:
    """The parts a diffusers folder must have: its family's (SDXL: both text encoders and
    tokenizers), or SD-1.x's when no family recognises it (what it lacks to be one)."""
    try:
        return family_of(path).parts
    except ValueError:
        from .families import SD

        return SD.parts


def check_model_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path if it is a usable local model, else raise naming what's missing."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"base model not found: {p} (lorapipe loads local paths only)")
    if p.is_dir():
        missing = [c for c in _family_or_none(p).parts if not (p / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{p}: not a complete diffusers folder (missing {missing})")
    elif p.suffix != ".safetensors":
        raise ValueError(f"{p}: expected a diffusers folder or a single-file .safetensors")
    return p


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
    needed = _family_or_none(checkpoint, c).config_files
    missing = [f for f in needed if not (c / f).exists()]
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


@phase("model")
def load_parts(
    path: str | os.PathLike,
    parts=None,
    original_config: str | None = None,
    vae: str | os.PathLike | None = None,
) -> dict:
    """Load the named components of a base model, offline and memory-mapped.

    Args:
        path: a diffusers folder, or a single-file ``.safetensors`` checkpoint in the original
            LDM/CompVis key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
            ``cond_stage_model.transformer.*``), e.g. ``v1-5-pruned.safetensors``.
        parts: which of the family's parts to load (SD: unet, vae, text_encoder, tokenizer,
            scheduler); None: all of them.
        original_config: for a single file (required then): a local diffusers folder whose
            configs, tokenizer and scheduler describe it; its weights, if any, are not read.
        vae: a local VAE folder (`check_vae_folder`) loaded instead of the model's own VAE
            (e.g. SDXL's fp16-fix VAE); the model's VAE is then neither read nor converted.

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
    if p.is_file():
        cfg = check_config_folder(p, original_config)
    family = family_of(p, original_config)
    parts = family.parts if parts is None else tuple(parts)
    unknown = [x for x in parts if x not in family.parts]
    if unknown:
        raise ValueError(f"unknown model part(s) {unknown} (have: {', '.join(family.parts)})")
    if vae is not None and "vae" in parts:
        rest = load_parts(p, [x for x in parts if x != "vae"], original_config)
        return {k: rest[k] if k != "vae" else load_vae(vae) for k in parts}
    if p.is_dir():
        return {part: _load_folder_part(family, p, part) for part in parts}
    out = {}
    weights = [k for k in parts if k in family.weight_parts]
    if weights:
        skip = [k for k in family.parts if k not in weights]
        pipe = _single_file_pipeline(family, p, cfg, skip=skip)
        out = {k: getattr(pipe, k) for k in weights}
    # tokenizer and scheduler are not in the file: the same loaders as for a folder
    rest = [k for k in parts if k not in family.weight_parts]
    out.update({k: _load_folder_part(family, cfg, k) for k in rest})
    return {k: out[k] for k in parts}


def check_vae_folder(vae: str | os.PathLike) -> Path:
    """A ``vae:`` override: a local diffusers AutoencoderKL folder (``config.json`` and
    weights, as ``madebyollin/sdxl-vae-fp16-fix``), or a model folder with a ``vae/`` part;
    returns the folder holding ``config.json``, else raises naming what is missing."""
    v = Path(vae)
    if not v.is_dir():
        raise FileNotFoundError(f"vae override not found: {v} (a local diffusers VAE folder)")
    folder = v / "vae" if (v / "vae" / "config.json").is_file() else v
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"vae override {v}: no config.json (a diffusers VAE folder)")
    return folder


def load_vae(vae: str | os.PathLike):
    """The AutoencoderKL of a ``vae:`` override folder (`check_vae_folder`), offline."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(check_vae_folder(vae)), local_files_only=True)


def _load_folder_part(family: Family, folder: Path, part: str):
    cls = family.part_class(part)
    return cls.from_pretrained(str(folder), subfolder=part, local_files_only=True)


def _single_file_pipeline(family: Family, p: Path, cfg: Path, skip=()):
    """``from_single_file`` with every config from the local folder ``cfg``: no hub access.

    Components named in ``skip`` are passed as None, so they are neither read nor converted.
    """
    return family.pipeline_class().from_single_file(
        str(p),
        config=str(cfg),
        local_files_only=True,
        **_pipeline_kwargs(family),
        **{k: None for k in skip},
    )


# SD-1.x/2.x pipelines: no safety checker (the family's `pipeline_kwargs` for others)
_SD_PIPELINE_KWARGS = {"safety_checker": None, "feature_extractor": None,
                       "requires_safety_checker": False}  # fmt: skip


def _pipeline_kwargs(family) -> dict:
    """What loading ``family``'s pipeline passes besides the model (SDXL: no watermarker)."""
    return dict(getattr(family, "pipeline_kwargs", _SD_PIPELINE_KWARGS))


@phase("model")
def load_pipeline(
    path: str | os.PathLike, original_config: str | None = None, vae: str | None = None
):
    """The family's sampling pipeline (sampler from the model's own config), folder or file;
    with the ``vae`` override folder's VAE instead of the model's own when given."""
    p = check_model_path(path)
    extra = {"vae": load_vae(vae)} if vae is not None else {}
    if p.is_file():
        cfg = check_config_folder(p, original_config)
        family = family_of(p, cfg)
        return family.pipeline_class().from_single_file(
            str(p), config=str(cfg), local_files_only=True, **_pipeline_kwargs(family), **extra
        )
    family = family_of(p)
    return family.pipeline_class().from_pretrained(
        str(p), local_files_only=True, **_pipeline_kwargs(family), **extra
    )


def part_fingerprint(
    path: str | os.PathLike, part: str | None = None, vae: str | os.PathLike | None = None
) -> str:
    """sha256 over a model's (or one component's) files; see `fingerprint.tree_digest`. The
    ``vae`` part of a model with a ``vae:`` override is the override folder's digest."""
    if part == "vae" and vae is not None:
        return tree_digest(check_vae_folder(vae))
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


def adapter_metadata(cfg) -> dict:
    """LoraConfig as JSON-stable metadata (sets sorted, so bytes are the same in every process)."""
    d = cfg.to_dict()
    return {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in d.items()}
