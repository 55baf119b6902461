"""Stable Diffusion XL: two CLIP text encoders (the second with a projection), cross-attention
on both encoders' penultimate hidden states concatenated, and added conditioning (``text_time``):
the second encoder's pooled, projected output plus six size numbers per image (original size,
crop top-left, target size, each as (height, width)) that the shard stage records exactly.

Names as diffusers' SDXL pipeline and training example use them (diffusers 0.42, read in
``pipeline_stable_diffusion_xl.py``: ``encode_prompt`` takes ``hidden_states[-2]`` of each
encoder and ``text_embeds`` of the second; ``_get_add_time_ids`` concatenates original size,
crop top-left and target size).
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import Family

# the pipelines diffusers names SDXL base folders with
_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
_MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
_TEXT_FILES = ("config.json", "model.safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class SDXL(Family):
    name = "sdxl"
    title = "SDXL"
    parts = (
        "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
    )  # fmt: skip
    weight_parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    text_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    latent_parts = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    config_files = (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer",
        "tokenizer_2",
    )
    tiny_files = {
        "unet": _MODEL_FILES,
        "vae": _MODEL_FILES,
        "text_encoder": _TEXT_FILES,
        "text_encoder_2": _TEXT_FILES,
        "tokenizer": _TOKENIZER_FILES,
        "tokenizer_2": _TOKENIZER_FILES,
        "scheduler": ("scheduler_config.json",),
    }
    # CLIP attention projections of both encoders (kohya's SDXL text-encoder LoRA set)
    text_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    # sd-scripts' LORA_PREFIX_TEXT_ENCODER1/2 (ComfyUI's comfy/lora.py and A1111's Lora
    # extension map these names for SDXL)
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_",
                      "text_encoder_2": "lora_te2_"}  # fmt: skip
    base_version_prefix = "sdxl_"
    # what cond holds per caption (the latent cache stores each): hidden states, pooled output
    cond_keys = ("text", "pooled")
    pipeline_kwargs = {"add_watermarker": False}  # samples are compared bit for bit

    def matches(self, model_index: dict, unet_config: dict) -> bool:
        if model_index.get("_class_name"):
            return model_index["_class_name"] in _PIPELINES
        # no model_index.json: SDXL's UNet conditions on pooled text + size ids
        return unet_config.get("addition_embed_type") == "text_time"

    def part_class(self, part: str):
        if part == "unet":
            from diffusers import UNet2DConditionModel as cls
        elif part == "vae":
            from diffusers import AutoencoderKL as cls
        elif part == "text_encoder":
            from transformers import CLIPTextModel as cls
        elif part == "text_encoder_2":
            from transformers import CLIPTextModelWithProjection as cls
        elif part in ("tokenizer", "tokenizer_2"):
            from transformers import CLIPTokenizer as cls
        else:  # training wants the DDPM forward process whatever sampler the folder names
            from diffusers import DDPMScheduler as cls
        return cls

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def text_encoders(self, parts: dict) -> list:
        return [parts["text_encoder"], parts["text_encoder_2"]]

    def encode_prompts(self, parts: dict, prompts: list[str], device=None) -> dict:
        """``{"text": (N, 77, D1 + D2), "pooled": (N, P)}``: each encoder's penultimate hidden
        state (prompts padded to the tokenizer's max length, truncated), concatenated, and the
        second encoder's projected pooled output, as the SDXL pipeline encodes prompts."""
        import torch

        hidden, pooled = [], None
        for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tokenizer = parts[tok]
            ids = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids  # fmt: skip
            out = parts[enc](ids.to(device) if device is not None else ids,
                             output_hidden_states=True)  # fmt: skip
            hidden.append(out.hidden_states[-2])
            if enc == "text_encoder_2":
                pooled = out.text_embeds
        return {"text": torch.cat(hidden, dim=-1), "pooled": pooled}

    def added_cond(self, cond: dict, metas: list[dict], device=None) -> dict:
        """The UNet's ``added_cond_kwargs`` of a batch: ``text_embeds`` (the pooled output in
        ``cond``) and ``time_ids`` (`time_ids` of each sample's shard record)."""
        import torch

        pooled = cond["pooled"]
        ids = torch.tensor([time_ids(m) for m in metas], dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": ids.to(device or pooled.device)}

    def build_tiny(self, out_dir: str | os.PathLike, seed: int = 0) -> Path:
        from ..tiny_sdxl import build_tiny_sdxl

        return build_tiny_sdxl(out_dir, seed)

    def architecture(self, unet_config: dict, scheduler_config: dict) -> dict[str, str]:
        """sd-scripts' SDXL labels (its SDXL_MODEL_VERSION_STR and ARCH_SD_XL_V1_BASE, and the
        implementation it names for SDXL LoRAs); v-prediction from the scheduler config."""
        v = (scheduler_config or {}).get("prediction_type") == "v_prediction"
        return {
            "ss_v2": "False",
            "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.prediction_type": "v" if v else "epsilon",
        }

    def kohya_unet_module(self, module: str, unet_config: dict) -> str:
        """sd-scripts names SDXL's UNet modules by their original (LDM) paths
        (``library/sdxl_original_unet.py``): ``input_blocks.4.1.transformer_blocks.0.attn1``."""
        from ..tiny_sdxl import sdxl_unet_key_to_ldm

        return sdxl_unet_key_to_ldm(f"{module}.weight", unet_config).removesuffix(".weight")


def time_ids(meta: dict) -> list[int]:
    """SDXL's six size numbers of one image, from what the shard stage recorded about it:
    ``original_size`` (the decoded image, EXIF-oriented, as [width, height]), ``crop`` ([left,
    top] in the resized image) and ``size`` (the bucket, [width, height]); SDXL wants each as
    (height, width): original (h, w), crop (top, left), target (h, w)."""
    (ow, oh), (left, top), (tw, th) = meta["original_size"], meta["crop"], meta["size"]
    return [int(oh), int(ow), int(top), int(left), int(th), int(tw)]
