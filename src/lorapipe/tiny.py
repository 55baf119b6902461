"""Build a tiny Stable-Diffusion-1.x-shaped model from code, with a fixed seed.

The folder it writes is a normal diffusers pipeline folder (unet, vae, text_encoder, tokenizer,
scheduler, model_index.json) that `StableDiffusionPipeline.from_pretrained` loads offline, exactly as
it would load a real SD-1.5 folder. Shapes follow SD-1.x (4 latent channels, VAE downsampling x8,
cross-attention on CLIP hidden states) at toy widths, so the whole pipeline runs on a CPU in seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Words of the demo captions get BPE merges so tokenization is real BPE, not only characters.
MERGE_WORDS = ("a", "picture", "in", "style", "lorapipe", "photo", "of", "house", "painting", "the")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (all 256 bytes)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP BPE vocabulary: every byte with and without `</w>`, plus merges for demo words.

    Returns:
        (vocab, merges): token -> id, and the merge list in rank order.
    """
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for word in MERGE_WORDS:
        # Left-to-right merges: ("p","i"), ("pi","c"), ... ending with the "</w>" form.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in tokens:
                tokens.append(merged)
            parts = [merged] + parts[2:]
    tokens += list(SPECIAL_TOKENS)
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a seeded tiny SD-1.x-shaped diffusers folder to ``out_dir`` (atomically).

    Args:
        out_dir: destination folder; replaced if it exists.
        seed: torch seed for the random weights; the same seed gives the same bytes.

    Returns:
        The folder written.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent if out.parent.exists() else None))
    try:
        vocab, merges = tokenizer_files()
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 32, 32),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=vocab[SPECIAL_TOKENS[0]],
                eos_token_id=vocab[SPECIAL_TOKENS[1]],
                pad_token_id=vocab[SPECIAL_TOKENS[1]],
                hidden_size=32,
                intermediate_size=64,
                layer_norm_eps=1e-5,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=len(vocab),
                max_position_embeddings=77,
            )
        )
        scheduler = DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            prediction_type="epsilon",
            clip_sample=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        staging = tmp / "model"
        pipe.save_pretrained(staging, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
