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
        v2 = int(unet_config.get("cross_attention_dim") or 768) >= 1024
        vpred = scheduler_config.get("prediction_type") == "v_prediction"
        version = ("sd_v2" if v2 else "sd_v1") + ("_v" if vpred else "")
        arch = "stable-diffusion-v2-768-v" if v2 and vpred else (
            "stable-diffusion-v2-512" if v2 else "stable-diffusion-v1"
        )
        return {
            "ss_base_model_version": version,
            "ss_v2": str(v2),
            "modelspec.architecture": f"{arch}/lora",
        }
