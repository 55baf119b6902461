"""Base model loading: diffusers folder and single-file LDM checkpoint, offline, same results."""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import pytest

from lorapipe.models import check_config_folder, check_model_path, copy_configs, load_parts


def esc(x) -> str:
    return re.escape(str(x))


def config_of(component) -> dict:
    """A component's config without where it was loaded from."""
    cfg = component.config
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: v for k, v in d.items() if k not in ("_name_or_path", "transformers_version")}


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model as one LDM-layout file, plus a weights-free config folder describing it."""
    from lorapipe.tiny import write_single_file

    d = tmp_path_factory.mktemp("single")
    f = write_single_file(tiny_model, d / "tiny-pruned.safetensors")
    cfg = copy_configs(tiny_model, d / "tiny-config")
    return f, cfg


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (HF_HUB_OFFLINE is set too, in conftest)."""

    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_single_file_has_the_ldm_layout(single_file, tiny_model, tmp_path):
    from safetensors import safe_open

    from lorapipe.tiny import write_single_file

    f, cfg = single_file
    with safe_open(str(f), "pt") as fh:
        keys = set(fh.keys())
        attn_q = fh.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    for k in (  # names as in v1-5-pruned.safetensors
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.output_blocks.3.1.proj_out.weight",
        "model.diffusion_model.out.2.bias",
        "model.diffusion_model.time_embed.0.weight",
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.norm_out.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert k in keys, k
    assert attn_q.ndim == 4  # LDM VAE attention projections are 1x1 convolutions
    # one tensor per component tensor (+ CLIP position_ids), nothing lost or invented
    parts = load_parts(tiny_model, ("unet", "vae", "text_encoder"))
    sizes = [len(part.state_dict()) for part in parts.values()]
    assert len(keys) == sum(sizes) + 1
    # byte-reproducible
    again = write_single_file(tiny_model, tmp_path / "again.safetensors")
    assert again.read_bytes() == f.read_bytes()
    # the config folder holds no weights: what loads below comes from the single file
    assert not [p for p in cfg.rglob("*") if p.suffix == ".safetensors"]


def test_single_file_loads_the_same_weights_offline(single_file, tiny_model, no_network):
    import torch

    f, cfg = single_file
    a = load_parts(f, original_config=str(cfg))
    b = load_parts(tiny_model)
    assert list(a) == list(b)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = a[part].state_dict(), b[part].state_dict()
        assert sa.keys() == sb.keys(), part
        for k in sb:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{part}.{k}"
        assert config_of(a[part]) == config_of(b[part]), part
    assert type(a["scheduler"]) is type(b["scheduler"])
    assert config_of(a["scheduler"]) == config_of(b["scheduler"])
    text = ["a picture of a house"]
    assert a["tokenizer"](text).input_ids == b["tokenizer"](text).input_ids
    # a subset loads only what is asked for
    sub = load_parts(f, ("vae", "tokenizer"), original_config=str(cfg))
    assert list(sub) == ["vae", "tokenizer"]


def test_single_file_pipeline_makes_the_same_image(single_file, tiny_model, no_network):
    import numpy as np
    import torch

    from lorapipe.models import load_pipeline

    f, cfg = single_file
    images = []
    for pipe in (load_pipeline(f, str(cfg)), load_pipeline(tiny_model)):
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator("cpu").manual_seed(0)
        out = pipe("a picture of a house", num_inference_steps=3, height=64, width=64,
                   generator=g, output_type="np")
        images.append(out.images[0])
    assert images[0].shape == (64, 64, 3)
    assert np.array_equal(images[0], images[1])
    assert images[0].std() > 0  # an image, not a constant


def test_single_file_needs_a_local_config_folder(single_file, tmp_path):
    f, cfg = single_file
    need = rf"{esc(f.name)}: a single-file checkpoint needs `original_config`"
    with pytest.raises(ValueError, match=need):
        load_parts(f)
    with pytest.raises(FileNotFoundError, match=rf"not a folder: {esc(tmp_path / 'nope')}"):
        load_parts(f, original_config=str(tmp_path / "nope"))
    yaml = tmp_path / "v1-inference.yaml"
    yaml.write_text("model: {}\n")
    with pytest.raises(FileNotFoundError, match=r"an LDM \.yaml cannot be loaded offline"):
        check_config_folder(f, yaml)
    partial = copy_configs(cfg, tmp_path / "partial")
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(FileNotFoundError, match=rf"{esc(partial)} lacks \['tokenizer'\]"):
        load_parts(f, ("unet",), original_config=str(partial))
    with pytest.raises(ValueError, match=r"unknown model part\(s\) \['safety_checker'\]"):
        load_parts(f, ("safety_checker",), original_config=str(cfg))


def test_check_model_path_errors_name_the_path(tiny_model, tmp_path):
    assert check_model_path(tiny_model) == tiny_model
    missing = tmp_path / "models" / "sd15"
    with pytest.raises(FileNotFoundError, match=rf"not found: {esc(missing)} .*local paths"):
        check_model_path(missing)
    partial = copy_configs(tiny_model, tmp_path / "partial")
    shutil.rmtree(partial / "vae")
    with pytest.raises(FileNotFoundError, match=rf"{esc(partial)}: not a complete .*\['vae'\]"):
        check_model_path(partial)
    ckpt = tmp_path / "v1-5-pruned.ckpt"
    ckpt.write_bytes(b"\0")
    with pytest.raises(ValueError, match=rf"{esc(ckpt)}: expected a diffusers folder or a single"):
        check_model_path(ckpt)
