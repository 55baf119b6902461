"""Build a tiny Stable-Diffusion-1.x-shaped model from code, with a fixed seed.

The folder it writes is a normal diffusers pipeline folder (unet, vae, text_encoder, tokenizer,
scheduler, model_index.json) that `StableDiffusionPipeline.from_pretrained` loads offline, exactly
as it would load a real SD-1.5 folder. Shapes follow SD-1.x (4 latent channels, VAE downsampling
x8, cross-attention on CLIP hidden states) at toy widths, so the whole pipeline runs on a CPU in
seconds. `write_single_file` turns such a folder into one LDM-layout checkpoint file.
"""

from __future__ import annotations

import os
import shutil
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


def _tiny_unet(seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
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


def _tiny_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
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


def _tiny_text_encoder(seed: int, vocab: dict[str, int]):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
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


def _tiny_pipeline(seed: int):
    """The tiny SD-1.x pipeline: UNet, VAE and text encoder seeded ``seed``, +1, +2."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=_tiny_unet(seed),
        vae=_tiny_vae(seed + 1),
        text_encoder=_tiny_text_encoder(seed + 2, vocab),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a seeded tiny SD-1.x-shaped diffusers folder to ``out_dir`` (atomically).

    Args:
        out_dir: destination folder; replaced if it exists.
        seed: torch seed for the random weights; the same seed gives the same bytes.

    Returns:
        The folder written.
    """
    from .io import set_new_file_modes, staging_dir

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


# --- single-file (LDM / CompVis layout) export ------------------------------------------------
# The inverse of diffusers' single-file conversion (diffusers/loaders/single_file_utils.py:
# convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint) for
# SD-1.x-shaped models, so tests can load a `v1-5-pruned.safetensors`-like file offline.

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, table: dict[str, str], where: str) -> str:
    """Rename the module of ``rest`` (``<module>.<weight|bias>``) through ``table``."""
    module, _, leaf = rest.rpartition(".")
    if module not in table:
        raise KeyError(f"{where}: no LDM name for {rest!r}")
    return f"{table[module]}.{leaf}"


def unet_key_to_ldm(key: str, config: dict) -> str:
    """Diffusers UNet2DConditionModel key -> LDM ``model.diffusion_model.`` key (without prefix).

    LDM numbers the down path as one flat ``input_blocks`` list (conv_in first, then per level
    ``layers_per_block`` (resnet, attention) pairs, then the downsampler), the up path as one flat
    ``output_blocks`` list (``layers_per_block + 1`` pairs per level; the upsampler sits after the
    attention, or after the resnet when the level has none).
    """
    import re

    lpb = config["layers_per_block"]
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key
    )
    if m:
        side, level, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if side == "down":
            first = 1 + level * (lpb + 1)
            if kind == "downsamplers":
                return f"input_blocks.{first + lpb}.0.{rest.replace('conv.', 'op.', 1)}"
            block = f"input_blocks.{first + j}"
        else:
            first = level * (lpb + 1)
            if kind == "upsamplers":
                has_attn = "CrossAttn" in config["up_block_types"][level]
                return f"output_blocks.{first + lpb}.{2 if has_attn else 1}.{rest}"
            block = f"output_blocks.{first + j}"
        if kind == "resnets":
            return f"{block}.0.{_rename_head(rest, _UNET_RESNET, key)}"
        return f"{block}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":  # resnet, attention, resnet
            return f"middle_block.{2 * j}.{_rename_head(rest, _UNET_RESNET, key)}"
        return f"middle_block.1.{rest}"
    raise KeyError(f"unet: no LDM name for {key!r}")


def vae_key_to_ldm(key: str, config: dict) -> str:
    """Diffusers AutoencoderKL key -> LDM ``first_stage_model.`` key (without prefix).

    The LDM decoder numbers its up levels from the lowest resolution (``up.{n-1}`` runs first).
    """
    import re

    n_up = len(config["up_block_types"])
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return key  # quant_conv, post_quant_conv
    side, rest = m[1], m[2]
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest
    )
    if m:
        way, level, kind, j, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
        level = level if way == "down" else n_up - 1 - level
        if kind == "resnets":
            tail = tail.replace("conv_shortcut.", "nin_shortcut.")
            return f"{side}.{way}.{level}.block.{j}.{tail}"
        return f"{side}.{way}.{level}.{way}sample.{tail}"  # downsample.conv / upsample.conv
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return f"{side}.mid.block_{int(m[1]) + 1}.{m[2]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest)
    if m:
        return f"{side}.mid.attn_1.{_rename_head(m[1], _VAE_ATTN, key)}"
    return key  # conv_in, conv_out


def write_single_file(model_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write a diffusers SD-1.x folder's UNet, VAE and CLIP text encoder as one LDM-layout file.

    Keys as in the original CompVis checkpoints (`v1-5-pruned.safetensors`):
    ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE, attention projections as
    1x1 convolutions), ``cond_stage_model.transformer.text_model.*`` (CLIP, with its
    ``position_ids``). Tokenizer and scheduler are not in such a file: loading it needs a
    diffusers folder of configs (see `lorapipe.models.load_parts`). The output is
    byte-reproducible and written atomically.
    """
    import json

    import torch
    from safetensors.torch import load_file

    from .io import save_safetensors

    src = Path(model_dir)

    def part(name: str, weights: str) -> tuple[dict, dict]:
        cfg = json.loads((src / name / "config.json").read_text(encoding="utf-8"))
        return load_file(src / name / weights), cfg

    out: dict[str, torch.Tensor] = {}

    def put(key: str, value) -> None:
        if key in out:
            raise KeyError(f"two tensors map to {key!r}")
        out[key] = value.contiguous()

    unet, unet_cfg = part("unet", "diffusion_pytorch_model.safetensors")
    for k, v in unet.items():
        put(LDM_UNET_PREFIX + unet_key_to_ldm(k, unet_cfg), v)
    vae, vae_cfg = part("vae", "diffusion_pytorch_model.safetensors")
    for k, v in vae.items():
        ldm = vae_key_to_ldm(k, vae_cfg)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        put(LDM_VAE_PREFIX + ldm, v)
    clip, clip_cfg = part("text_encoder", "model.safetensors")
    for k, v in clip.items():
        # transformers >= 5.6 saves CLIPTextModel without the `text_model.` level; LDM has it.
        put(LDM_CLIP_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}"), v)
    n_pos = clip_cfg["max_position_embeddings"]
    put(LDM_CLIP_PREFIX + "text_model.embeddings.position_ids", torch.arange(n_pos)[None])
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, out_file)
    return out_file
