"""The diffusers file lorapipe writes loads right in every diffusers (issue 14, items 1 and 2).

- Text-encoder keys have the names diffusers' own ``save_lora_weights`` writes for a
  text-encoder LoRA of transformers 4's CLIPTextModel (``text_encoder.text_model.encoder…``):
  compared against a file diffusers writes itself, and checked against what diffusers 0.32's
  loader looks up (the lookup that failed with an IndexError on transformers-5 names).
- The LoRA scale (alpha / rank, here 1.5: alpha != rank and not a power of two) is in the up
  weights: a loader that ignores ``lora_adapter_metadata`` (diffusers before it, which takes
  alpha = rank) gets the trained delta from the tensors alone; the installed diffusers gives the
  same image with the metadata and with it stripped, and the same image as a file with the
  scale in the metadata (the old layout).
- The kohya file made from it has the trained alpha and the up weights as trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_export import lora_scalings, read, render

RANK, ALPHA = 4, 6.0  # scale 1.5: alpha != rank, and rounding shows (not a power of two)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def seeded_lora(module, cfg, seed: int) -> dict:
    """Add ``cfg`` to ``module`` with non-zero (seeded) lora_B; its peft state dict."""
    import torch
    from peft.utils import get_peft_model_state_dict

    module.add_adapter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = get_peft_model_state_dict(module, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in state.items()}


def transformers4_layout(text_encoder):
    """``text_encoder`` (transformers 5's CLIPTextModel, with its LoRA) in transformers 4's
    module tree, where the CLIP modules sit under ``.text_model``."""
    import torch

    wrapper = torch.nn.Module()
    wrapper.text_model = text_encoder
    wrapper.peft_config = text_encoder.peft_config
    return wrapper


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model) -> dict:
    """A UNet + text-encoder LoRA written by lorapipe, by diffusers itself (transformers-4
    names, scale in the metadata) and in lorapipe's old layout (transformers-5 names)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    from lorapipe.export import export_kohya, save_diffusers_lora
    from lorapipe.families import family_of
    from lorapipe.models import adapter_metadata, lora_config

    d = tmp_path_factory.mktemp("portable")
    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    te = CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder")
    ucfg = lora_config(RANK, ALPHA, UNET_TARGETS)
    tcfg = lora_config(RANK, ALPHA, family_of(tiny_model).text_lora_targets)
    unet_state, te_state = seeded_lora(unet, ucfg, 1), seeded_lora(te, tcfg, 2)
    umeta, tmeta = adapter_metadata(ucfg), adapter_metadata(tcfg)
    lp = d / "lorapipe" / "pytorch_lora_weights.safetensors"
    lp.parent.mkdir()
    save_diffusers_lora(unet_state, umeta, lp, {"lorapipe_run": "demo"}, te_state, tmeta)
    tf4 = get_peft_model_state_dict(transformers4_layout(te), save_embedding_layers=False)
    for name, te_layers in (("diffusers", tf4), ("old", te_state)):
        StableDiffusionPipeline.save_lora_weights(
            d / name,
            unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(te_layers),
            unet_lora_adapter_metadata=umeta,
            text_encoder_lora_adapter_metadata=tmeta,
        )
    kohya = d / "lorapipe" / "demo.safetensors"
    export_kohya(lp, kohya, {**run_cfg(), "lora_rank": RANK, "lora_alpha": ALPHA}, {})
    return {
        "lorapipe": lp, "diffusers": d / "diffusers" / lp.name, "old": d / "old" / lp.name,
        "kohya": kohya, "unet_state": unet_state, "te_state": te_state, "te": te,
    }  # fmt: skip


def run_cfg() -> dict:
    from test_export import run_cfg as export_run_cfg

    return export_run_cfg()


def strip_adapter_metadata(src: Path, dst: Path) -> Path:
    """``src`` without ``lora_adapter_metadata``: what a loader that predates it sees."""
    from lorapipe.io import save_safetensors

    tensors, meta = read(src)
    save_safetensors(tensors, dst, {k: v for k, v in meta.items() if k != "lora_adapter_metadata"})
    return dst


def test_text_encoder_keys_are_the_ones_diffusers_writes(files):
    lp, _ = read(files["lorapipe"])
    ref, _ = read(files["diffusers"])
    assert set(lp) == set(ref)  # every key: UNet and text encoder
    te_keys = [k for k in lp if k.startswith("text_encoder.")]
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    for k in lp:
        assert lp[k].shape == ref[k].shape and lp[k].dtype == ref[k].dtype, k


def test_diffusers_032_finds_the_text_encoder_lora(files):
    """diffusers 0.32 (``_load_lora_into_text_encoder``, read in its v0.32.2 source) strips the
    ``text_encoder.`` prefix, converts to peft names, and takes each rank from
    ``<module>.lora_B.weight`` for every ``q/k/v/out_proj`` of
    ``text_model.encoder.layers.<i>.self_attn`` of transformers 4's CLIPTextModel; with none
    found it fails with an IndexError. Every one of them is in the file, at the trained rank."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    tensors, _ = read(files["lorapipe"])
    te = {k.removeprefix("text_encoder."): v for k, v in tensors.items() if k.startswith("text_")}
    peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te))
    layers = files["te"].config.num_hidden_layers
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            up = peft[f"text_model.encoder.layers.{i}.self_attn.{proj}.lora_B.weight"]
            assert up.shape[1] == RANK
    assert len(peft) == 2 * 4 * layers


def test_metadata_says_scale_one_and_keeps_the_trained_alpha(files):
    from lorapipe.export import read_alpha, weight_scale

    _, meta = read(files["lorapipe"])
    packed = json.loads(meta["lora_adapter_metadata"])
    for c in ("unet", "text_encoder"):
        assert (packed[f"{c}.r"], packed[f"{c}.lora_alpha"]) == (RANK, RANK)
        assert read_alpha(meta, c) == (ALPHA, RANK)
        assert weight_scale(meta, c) == ALPHA / RANK
    assert json.loads(meta["lorapipe_trained_alpha"])["unet"]["lora_alpha"] == ALPHA
    _, ref_meta = read(files["diffusers"])
    assert set(json.loads(ref_meta["lora_adapter_metadata"])) == set(packed)


def test_a_loader_without_metadata_gets_the_trained_delta_from_the_tensors(files):
    """Such a loader takes alpha = rank: delta = up @ down. That is the trained
    alpha / rank * B @ A of each module (UNet and text encoder)."""
    import torch

    tensors, _ = read(files["lorapipe"])
    trained = {f"unet.{k}": v for k, v in files["unet_state"].items()}
    trained.update({f"text_encoder.text_model.{k}": v for k, v in files["te_state"].items()})
    n = 0
    for key, down in tensors.items():
        kind = next((k for k in (".lora.down.weight", ".lora_linear_layer.down.weight")
                     if key.endswith(k)), None)  # fmt: skip
        if kind is None:
            continue
        module = key.removesuffix(kind)
        up = tensors[module + kind.replace("down", "up")]
        b, a = trained[f"{module}.lora_B.weight"], trained[f"{module}.lora_A.weight"]
        want = ALPHA / RANK * b @ a
        torch.testing.assert_close(up @ down, want, rtol=1e-6, atol=1e-7)
        n += 1
    assert n == len(tensors) // 2 and n > 0


@pytest.fixture(scope="module")
def images(files, tiny_model, tmp_path_factory) -> dict:
    """Renders of the base model and of each file loaded by the installed diffusers (with the
    LoRA scalings it set)."""
    from diffusers import StableDiffusionPipeline

    stripped = strip_adapter_metadata(
        files["lorapipe"], tmp_path_factory.mktemp("stripped") / files["lorapipe"].name
    )
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = {"base": render(pipe)}
    for name, f in (*((k, files[k]) for k in ("lorapipe", "diffusers", "old", "kohya")),
                    ("stripped", stripped)):  # fmt: skip
        pipe.load_lora_weights(str(f.parent), weight_name=f.name)
        out[f"{name}_unet"] = lora_scalings(pipe.unet)
        out[f"{name}_te"] = lora_scalings(pipe.text_encoder)
        out[name] = render(pipe)
        pipe.unload_lora_weights()
    return out


def test_installed_diffusers_loads_it_to_the_image_of_before(images):
    import numpy as np

    assert images["lorapipe_te"] and set(images["lorapipe_te"]) == {1.0}  # te LoRA loaded
    assert set(images["lorapipe_unet"]) == {1.0}
    assert set(images["old_te"]) == {ALPHA / RANK}  # the old layout: scale in the metadata
    assert np.abs(images["lorapipe"] - images["base"]).max() > 0.05
    for other in ("old", "diffusers"):
        assert np.abs(images["lorapipe"] - images[other]).max() < 1e-4, other


def test_same_image_with_and_without_adapter_metadata(images):
    import numpy as np

    assert set(images["stripped_unet"]) == {1.0} and set(images["stripped_te"]) == {1.0}
    assert np.abs(images["stripped"] - images["lorapipe"]).max() < 1e-6


def test_kohya_file_of_it_has_the_trained_alpha_and_weights(files, images):
    import numpy as np
    import torch

    sd, meta = read(files["kohya"])
    assert meta["ss_network_alpha"] == "6" and meta["ss_network_dim"] == "4"
    modules = {k.split(".")[0] for k in sd}
    assert any(m.startswith("lora_te_text_model_encoder_layers_") for m in modules)
    trained = {f"lora_unet_{k}": v for k, v in files["unet_state"].items()}
    trained.update({f"lora_te_text_model_{k}": v for k, v in files["te_state"].items()})
    trained = {
        k.rsplit(".lora_", 1)[0].replace(".", "_") + ("." + k.rsplit(".lora_", 1)[1]): v
        for k, v in trained.items()
    }
    for m in modules:
        assert sd[f"{m}.alpha"].item() == ALPHA
        assert sd[f"{m}.lora_down.weight"].equal(trained[f"{m}.A.weight"])
        # the up weight as trained, but for the rounding of times and divided by the scale
        up = sd[f"{m}.lora_up.weight"]
        torch.testing.assert_close(up, trained[f"{m}.B.weight"], rtol=2.5e-7, atol=0)
    assert set(images["kohya_unet"]) == {ALPHA / RANK}
    assert np.abs(images["kohya"] - images["lorapipe"]).max() < 1e-4
