"""Build a tiny SDXL-shaped model from code, with a fixed seed, and write it as one SDXL file.

The folder is a normal diffusers SDXL folder (unet, vae, text_encoder, text_encoder_2,
tokenizer, tokenizer_2, scheduler, model_index.json) that
`StableDiffusionXLPipeline.from_pretrained` loads offline, as it loads
``stabilityai/stable-diffusion-xl-base-1.0``. Shapes follow SDXL at toy widths: a UNet with
``addition_embed_type: text_time`` (pooled text + six size ids), several transformer layers in
the deeper level and linear projections, cross-attention on both encoders' hidden states
concatenated (widths differ on purpose, so a mix-up of the two fails), a CLIPTextModel and a
CLIPTextModelWithProjection, two tokenizers (the second pads with ``!`` as SDXL's does), SDXL's
Euler scheduler config and VAE scaling factor.

`write_single_file_sdxl` writes such a folder in the layout of ``sd_xl_base_1.0.safetensors``
(``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.0.transformer.*``
for the first encoder, ``conditioner.embedders.1.model.*`` in OpenCLIP's layout for the second):
the inverse of diffusers' single-file conversion (``single_file_utils.convert_ldm_unet_checkpoint``,
``convert_open_clip_checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .io import set_new_file_modes, staging_dir
from .tiny import (
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    SPECIAL_TOKENS,
    _tiny_vae,
    tokenizer_files,
    unet_key_to_ldm,
    vae_key_to_ldm,
)

TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION = 16, 32, 24  # cross-attention width 48, pooled 24
TIME_EMBED_DIM = 8  # SDXL: 256 per size number
SDXL_VAE_SCALING = 0.13025
LDM_TE1_PREFIX = "conditioner.embedders.0.transformer."
LDM_TE2_PREFIX = "conditioner.embedders.1.model."


def _tiny_unet(seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),  # SDXL's block layout at toy widths
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
        attention_head_dim=(2, 4),  # heads per level (diffusers' name), head size 8
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TE2_PROJECTION,
        norm_num_groups=8,
    )


def _clip_config(vocab: dict[str, int], hidden: int, pad: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab[SPECIAL_TOKENS[0]],
        eos_token_id=vocab[SPECIAL_TOKENS[1]],
        pad_token_id=pad,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=3,  # the penultimate layer's output differs from the last one's
        vocab_size=len(vocab),
        max_position_embeddings=77,
        hidden_act="gelu",
        **extra,
    )


def _tiny_pipeline(seed: int):
    """The tiny SDXL pipeline: UNet, VAE, text encoders seeded ``seed``, +1, +2, +3."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = tokenizer_files()
    eos = vocab[SPECIAL_TOKENS[1]]
    vae = _tiny_vae(seed + 1)
    vae.register_to_config(scaling_factor=SDXL_VAE_SCALING, force_upcast=True)
    torch.manual_seed(seed + 2)
    te1 = CLIPTextModel(_clip_config(vocab, TE1_HIDDEN, eos))
    torch.manual_seed(seed + 3)
    te2 = CLIPTextModelWithProjection(
        _clip_config(vocab, TE2_HIDDEN, vocab["!"], projection_dim=TE2_PROJECTION)
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!"),
        unet=_tiny_unet(seed),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a seeded tiny SDXL-shaped diffusers folder to ``out_dir`` (atomically, replacing
    it); the same seed gives the same bytes. Returns the folder."""
    out = Path(out_dir)
    tmp = staging_dir(out)  # (a killed build's staging folder goes first)
    try:
        staging = tmp / "model"
        _tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)
        set_new_file_modes(staging)  # safetensors writes 0600 files: give them open()'s modes
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- single-file (SDXL checkpoint layout) ----------------------------------------------------

_UNET_ADDED = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sdxl_unet_key_to_ldm(key: str, config: dict) -> str:
    """Diffusers SDXL UNet key -> key under ``model.diffusion_model.`` (as sd-scripts'
    ``sdxl_original_unet.py`` names the modules): SD's numbering plus the added embedding."""
    module, _, leaf = key.rpartition(".")
    if module in _UNET_ADDED:
        return f"{_UNET_ADDED[module]}.{leaf}"
    return unet_key_to_ldm(key, config)


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def openclip_state(te2: dict) -> dict:
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (keys without the
    ``conditioner.embedders.1.model.`` prefix): q/k/v joined into ``attn.in_proj_*``, the
    projection as the ``text_projection`` matrix (transposed: OpenCLIP multiplies ``x @ P``)."""
    import re

    import torch

    out: dict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in te2.items():
        if k in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k == "text_model.embeddings.position_ids":
            continue
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
            layer, module, leaf = int(m[1]), m[2], m[3]
            if m2 := re.fullmatch(r"self_attn\.(q|k|v)_proj", module):
                qkv.setdefault((layer, leaf), {})[m2[1]] = v
                continue
            out[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[module]}.{leaf}"] = v
        else:
            raise KeyError(f"text_encoder_2: no OpenCLIP name for {k!r}")
    for (layer, leaf), parts in qkv.items():
        joined = torch.cat([parts["q"], parts["k"], parts["v"]])
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = joined
    return out


def write_single_file_sdxl(model_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write a diffusers SDXL folder's UNet, VAE and both text encoders as one file in the SDXL
    checkpoint layout (as ``sd_xl_base_1.0.safetensors``). Tokenizers and scheduler are not in
    such a file: loading it needs the folder's configs (`lorapipe.models.load_parts`).
    Byte-reproducible, written atomically."""
    import torch
    from safetensors.torch import load_file

    from .io import save_safetensors

    src = Path(model_dir)
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value) -> None:
        if key in out:
            raise KeyError(f"two tensors map to {key!r}")
        out[key] = value.contiguous()

    def part(name: str, weights: str) -> tuple[dict, dict]:
        cfg = json.loads((src / name / "config.json").read_text(encoding="utf-8"))
        return load_file(src / name / weights), cfg

    unet, unet_cfg = part("unet", "diffusion_pytorch_model.safetensors")
    for k, v in unet.items():
        put(LDM_UNET_PREFIX + sdxl_unet_key_to_ldm(k, unet_cfg), v)
    vae, vae_cfg = part("vae", "diffusion_pytorch_model.safetensors")
    for k, v in vae.items():
        ldm = vae_key_to_ldm(k, vae_cfg)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        put(LDM_VAE_PREFIX + ldm, v)
    te1, te1_cfg = part("text_encoder", "model.safetensors")
    for k, v in te1.items():
        put(LDM_TE1_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}"), v)
    n_pos = te1_cfg["max_position_embeddings"]
    put(LDM_TE1_PREFIX + "text_model.embeddings.position_ids", torch.arange(n_pos)[None])
    te2, _ = part("text_encoder_2", "model.safetensors")
    for k, v in openclip_state(te2).items():
        put(LDM_TE2_PREFIX + k, v)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, out_file)
    return out_file
