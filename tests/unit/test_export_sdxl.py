"""SDXL export: the diffusers file loads with StableDiffusionXLPipeline.load_lora_weights, the
kohya file has sd-scripts' SDXL names (UNet by its original module paths, lora_te1_/lora_te2_)
with .alpha tensors, and both give the same image, different from the base model's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lorapipe.config import load_config, load_yaml, resolve_run
from lorapipe.export import (
    architecture_metadata,
    export_kohya,
    kohya_state_dict,
    read_alpha,
    save_diffusers_lora,
)

REPO = Path(__file__).resolve().parents[2]
RANK, ALPHA = 4, 8.0  # alpha != rank: a dropped alpha shows as a wrong strength
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PROMPT = "a picture in lorapipe style"


def run_cfg() -> dict:
    cfg = load_yaml(REPO / "config" / "config.yaml")
    load_config(cfg, check_files=False)
    run = resolve_run(cfg, "demo")
    return dataclasses.replace(run, lora_rank=RANK, lora_alpha=ALPHA).to_dict()


def trained_states(model: Path, cfg: dict):
    """peft states of a trained-looking LoRA (non-zero lora_B, seeded) on the UNet and both
    text encoders of the tiny SDXL model, and their adapter configs, as training makes them."""
    import torch
    from peft.utils import get_peft_model_state_dict

    from lorapipe.models import adapter_metadata, load_parts, lora_config

    parts = load_parts(model, ("unet", "text_encoder", "text_encoder_2"))
    ucfg = lora_config(RANK, ALPHA, cfg["target_modules"])
    tcfg = lora_config(RANK, ALPHA, TE_TARGETS)
    g = torch.Generator().manual_seed(1234)
    states = []
    for part, lcfg in (("unet", ucfg), ("text_encoder", tcfg), ("text_encoder_2", tcfg)):
        module = parts[part]
        module.add_adapter(lcfg)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        states.append(get_peft_model_state_dict(module))
    return states, adapter_metadata(ucfg), adapter_metadata(tcfg)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sdxl) -> dict:
    d = tmp_path_factory.mktemp("sdxl-lora")
    cfg = run_cfg()
    (unet, te1, te2), umeta, tmeta = trained_states(tiny_sdxl, cfg)
    diffusers_file = d / "pytorch_lora_weights.safetensors"
    save_diffusers_lora(unet, umeta, diffusers_file, {"lorapipe_run": "demo"}, te1, tmeta, te2)
    unet_config = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    extra = architecture_metadata(unet_config, {"prediction_type": "epsilon"})
    extra.update({"lorapipe_run": "demo", "ss_steps": "3"})
    kohya_file = d / "demo.safetensors"
    export_kohya(diffusers_file, kohya_file, cfg, extra, unet_config=unet_config)
    return {"dir": d, "diffusers": diffusers_file, "kohya": kohya_file, "unet_config": unet_config}


def read(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_kohya_names_are_sd_scripts_sdxl_names(exported):
    sd, meta = read(exported["kohya"])
    modules = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in sd}
    prefixes = {m.split("_")[0] + "_" + m.split("_")[1] for m in modules}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    # the tiny UNet: level 0 no attention, level 1 two resnet+attention pairs (transformer
    # depth 2) -> input_blocks 4 and 5; mid block; up level 0 (attention) -> output_blocks 0-2
    for m in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_v",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_2_self_attn_out_proj",
    ):
        assert m in modules, m
    assert not any("down_blocks" in m or "up_blocks" in m or "mid_block" in m for m in modules)
    for m in modules:
        assert sd[f"{m}.alpha"].item() == ALPHA
        assert sd[f"{m}.lora_down.weight"].shape[0] == RANK
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def test_kohya_unet_names_are_modules_of_the_sdxl_checkpoint(exported, tiny_sdxl, tmp_path):
    """The sd-scripts names are the checkpoint's own module paths (ComfyUI and A1111 match
    ``lora_unet_`` names against the original UNet's state dict with dots as underscores)."""
    from safetensors import safe_open

    from lorapipe.tiny_sdxl import write_single_file_sdxl

    f = write_single_file_sdxl(tiny_sdxl, tmp_path / "xl.safetensors")
    with safe_open(str(f), "pt") as fh:
        ckpt = {
            "lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight")
            .replace(".", "_")
            for k in fh.keys() if k.startswith("model.diffusion_model.")
        }  # fmt: skip
    sd, _ = read(exported["kohya"])
    unet_modules = {k.rsplit(".", 1)[0] for k in sd if k.startswith("lora_unet_")}
    unet_modules = {m.removesuffix(".lora_down").removesuffix(".lora_up") for m in unet_modules}
    assert unet_modules and unet_modules <= ckpt, sorted(unet_modules - ckpt)[:5]


def test_diffusers_file_has_both_encoders_and_trained_alpha(exported):
    sd, meta = read(exported["diffusers"])
    comps = {k.split(".")[0] for k in sd}
    assert comps == {"unet", "text_encoder", "text_encoder_2"}
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.0.") for k in sd)
    for comp in comps:
        assert read_alpha(meta, comp) == (ALPHA, RANK)
    with pytest.raises(ValueError, match="kohya names need the base model's UNet config"):
        kohya_state_dict(sd, {**meta, "ss_base_model_version": "sdxl_base_v1-0"})


def render(pipe):
    import torch

    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(7)
    out = pipe(PROMPT, height=64, width=64, num_inference_steps=3, generator=gen,
               output_type="np")  # fmt: skip
    return out.images[0]


def test_both_files_give_the_same_image_and_change_it(exported, tiny_sdxl):
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True)
    base = render(pipe)
    images = {}
    for kind in ("diffusers", "kohya"):
        pipe.load_lora_weights(str(exported["dir"]), weight_name=exported[kind].name)
        # every LoRA module of each part loaded, text encoders included
        assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
        images[kind] = render(pipe)
        pipe.unload_lora_weights()
    assert np.array_equal(render(pipe), base)
    assert np.abs(images["diffusers"] - base).max() > 0.02
    np.testing.assert_allclose(images["kohya"], images["diffusers"], atol=2e-5)
