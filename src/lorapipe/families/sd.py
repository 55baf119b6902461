"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, 4-channel latents, cross-attention on
the encoder's last hidden state; epsilon or v-prediction (SD-2 768-v)."""

from __future__ import annotations

import os
from pathlib import Path

from .base import Family

# the pipelines diffusers names SD-1.x/2.x folders with
_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


class SD(Family):
    name = "sd"
    title = "SD-1.x/2.x"
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    weight_parts = ("unet", "vae", "text_encoder")
    text_parts = ("text_encoder", "tokenizer")
    latent_parts = ("vae", "text_encoder", "tokenizer")
    config_files = (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer",
    )
    tiny_files = {
        "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
        "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
        "text_encoder": ("config.json", "model.safetensors"),
        "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
        "scheduler": ("scheduler_config.json",),
    }
    # CLIP attention projections: kohya's SD-1.x text-encoder LoRA set
    text_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    base_version_prefix = "sd_v"  # sd_v1, sd_v1_v, sd_v2, sd_v2_v

    def matches(self, model_index: dict, unet_config: dict) -> bool:
        if model_index.get("_class_name"):
            return model_index["_class_name"] in _PIPELINES
        # no model_index.json: an SD UNet has no added (pooled text + size) conditioning
        return bool(unet_config) and not unet_config.get("addition_embed_type")

    def part_class(self, part: str):
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
        return cls

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def text_encoders(self, parts: dict) -> list:
        return [parts["text_encoder"]]

    def encode_prompts(self, parts: dict, prompts: list[str], device=None) -> dict:
        """``{"text": (N, L, D)}``, the last hidden states: padded to the tokenizer's max
        length, truncated. The latent cache and text-encoder training both encode through here,
        so a trained text encoder sees its prompts exactly as the cache would have stored them."""
        tokenizer, text_encoder = parts["tokenizer"], parts["text_encoder"]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        return {"text": text_encoder(ids.to(device) if device is not None else ids)[0]}

    def build_tiny(self, out_dir: str | os.PathLike, seed: int = 0) -> Path:
        from ..tiny import build_tiny_model

        return build_tiny_model(out_dir, seed)

    def architecture(self, unet_config: dict, scheduler_config: dict) -> dict[str, str]:
        """sd-scripts' labels: SD-2 is told from SD-1 by the UNet's ``cross_attention_dim``
        (1024 vs 768; anything below 1024, such as the tiny model's 32, is SD-1-shaped),
        v-prediction by the scheduler's ``prediction_type``: ``ss_v2``,
        ``ss_base_model_version`` (sd_v1, sd_v1_v, sd_v2, sd_v2_v), ``modelspec.architecture``
        (stable-diffusion-v1, -v2-512 or -v2-768-v, then "/lora") and
        ``modelspec.prediction_type`` (epsilon, v)."""
        v2 = int(unet_config.get("cross_attention_dim") or 768) >= 1024
        v = (scheduler_config or {}).get("prediction_type") == "v_prediction"
        arch = "stable-diffusion-v1"
        if v2:
            arch = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
        return {
            "ss_v2": str(v2),
            "ss_base_model_version": ("sd_v2" if v2 else "sd_v1") + ("_v" if v else ""),
            "modelspec.architecture": f"{arch}/lora",
            "modelspec.prediction_type": "v" if v else "epsilon",
        }
