"""The SDXL family: the tiny SDXL model, recognition, prompt encoding, size conditioning from the
shard records, single-file loading, and missing parts named before any job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lorapipe.families import SD, SDXL, family_named, family_of
from lorapipe.models import check_config_folder, check_model_path, copy_configs, load_parts


def digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_single(tiny_sdxl, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny SDXL model as one SDXL-layout file, plus a weights-free config folder."""
    from lorapipe.tiny_sdxl import write_single_file_sdxl

    d = tmp_path_factory.mktemp("sdxl-single")
    return write_single_file_sdxl(tiny_sdxl, d / "tiny-xl.safetensors"), copy_configs(
        tiny_sdxl, d / "tiny-xl-config"
    )


def image_array(pipe, prompt="a picture in lorapipe style", size=64):
    import torch

    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(0)
    out = pipe(prompt, num_inference_steps=2, height=size, width=size, generator=g,
               output_type="np")  # fmt: skip
    return out.images[0]


def test_tiny_sdxl_is_a_diffusers_sdxl_folder(tiny_sdxl, tmp_path):
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    fam = family_named("sdxl")
    written = set(digests(tiny_sdxl))
    listed = {"model_index.json"} | {f"{p}/{f}" for p, fs in fam.tiny_files.items() for f in fs}
    assert written == listed  # the planner knows a built model's files from tiny_files
    assert set(fam.tiny_files) == set(fam.parts)
    unet = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == 48  # both encoders' widths (16 + 32)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    img = image_array(pipe)
    assert img.shape == (64, 64, 3) and np.isfinite(img).all() and img.std() > 0.01
    # seeded: the same seed gives the same bytes, another seed other weights
    assert digests(family_named("sdxl").build_tiny(tmp_path / "again", seed=0)) == digests(
        tiny_sdxl
    )
    other = digests(family_named("sdxl").build_tiny(tmp_path / "other", seed=1))
    assert (
        other["unet/diffusion_pytorch_model.safetensors"]
        != digests(tiny_sdxl)["unet/diffusion_pytorch_model.safetensors"]
    )


def test_family_is_recognised_from_the_model(tiny_sdxl, tiny_model, tmp_path):
    assert isinstance(family_of(tiny_sdxl), SDXL) and isinstance(family_of(tiny_model), SD)
    # without model_index.json: from the UNet's added conditioning
    for src, cls in ((tiny_sdxl, SDXL), (tiny_model, SD)):
        d = tmp_path / src.name
        (d / "unet").mkdir(parents=True)
        shutil.copy(src / "unet" / "config.json", d / "unet" / "config.json")
        assert isinstance(family_of(d), cls)
    # a single file: from its original_config folder
    cfg = copy_configs(tiny_sdxl, tmp_path / "cfg")
    assert isinstance(family_of(tmp_path / "x.safetensors", cfg), SDXL)
    (tmp_path / "other" / "unet").mkdir(parents=True)
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ValueError, match="FluxPipeline model; lorapipe trains .*SDXL"):
        family_of(tmp_path / "other")


def test_encode_prompts_is_what_the_pipeline_conditions_on(tiny_sdxl):
    import torch
    from diffusers import StableDiffusionXLPipeline

    fam = family_of(tiny_sdxl)
    parts = load_parts(tiny_sdxl, fam.text_parts)
    prompts = ["a picture in lorapipe style", "a house", ""]
    with torch.inference_mode():
        cond = fam.encode_prompts(parts, prompts)
    assert set(cond) == {"text", "pooled"}
    assert tuple(cond["text"].shape) == (3, 77, 48) and tuple(cond["pooled"].shape) == (3, 24)
    assert len(fam.text_encoders(parts)) == 2
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True)
    with torch.inference_mode():
        text, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(cond["text"], text) and torch.equal(cond["pooled"], pooled)
    # the penultimate layers, not the last: the last hidden state of encoder 1 differs
    with torch.inference_mode():
        ids = parts["tokenizer"](prompts, padding="max_length", max_length=77,
                                 return_tensors="pt").input_ids  # fmt: skip
        last = parts["text_encoder"](ids).last_hidden_state
    assert not torch.allclose(cond["text"][..., :16], last)


def exif_rotated_jpeg(path: Path, stored=(120, 60)) -> None:
    """A JPEG stored ``stored`` wide/high with EXIF orientation 6 (displayed rotated 90°)."""
    img = Image.new("RGB", stored, (30, 160, 90))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, format="JPEG", exif=exif.tobytes())


def test_time_ids_are_the_shard_records(tmp_path, tiny_sdxl):
    """original size (as displayed), crop top-left (in the resized image) and target size of
    each image, in SDXL's (height, width) order: the shard stage's own records."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from lorapipe.images import make_buckets, nearest_bucket
    from lorapipe.manifest import ScanSettings, list_images, read_jsonl, scan_shard
    from lorapipe.shards import ShardSettings, write_shard

    root = tmp_path / "data"
    root.mkdir()
    sizes = {"wide.png": (200, 90), "tall.png": (70, 150), "square.png": (77, 77)}
    for rel, size in sizes.items():
        Image.new("RGB", size, (200, 40, 40)).save(root / rel)
    exif_rotated_jpeg(root / "rotated.jpg")  # stored 120x60, displayed 60x120
    sizes["rotated.jpg"] = (60, 120)
    manifest, captions = tmp_path / "m.jsonl", tmp_path / "c.jsonl"
    scan_shard(root, list_images(root), ScanSettings(64, 0.5, 10**7, "#ffffff"), manifest)
    captions.write_text("".join(json.dumps({"path": r["path"], "caption": "a photo"}) + "\n"
                                for r in read_jsonl(manifest)))  # fmt: skip
    settings = ShardSettings(64, 16, True, 10**7, "#ffffff")
    write_shard(root, manifest, captions, settings, tmp_path / "0.tar", tmp_path / "0.jsonl")
    metas = read_jsonl(tmp_path / "0.jsonl")
    assert len(metas) == 4
    pooled = torch.zeros(len(metas), 24)
    got = SDXL().added_cond({"text": None, "pooled": pooled}, metas, "cpu")
    assert got["text_embeds"] is pooled
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True)
    buckets = make_buckets(64, 16)
    for meta, ids in zip(metas, got["time_ids"], strict=True):
        w, h = sizes[meta["path"]]
        b = nearest_bucket(w, h, buckets)
        scale = max(b.width / w, b.height / h)
        rw, rh = max(b.width, round(w * scale)), max(b.height, round(h * scale))
        expected = pipe._get_add_time_ids(
            (h, w), ((rh - b.height) // 2, (rw - b.width) // 2), (b.height, b.width),
            torch.float32, text_encoder_projection_dim=24,
        )[0]  # fmt: skip
        assert torch.equal(ids, expected), meta["path"]
    assert any(ids[2] or ids[3] for ids in got["time_ids"])  # some image was cropped


def test_single_file_sdxl_loads_the_same_model(sdxl_single, tiny_sdxl):
    import numpy as np
    import torch
    from safetensors import safe_open

    from lorapipe.models import load_pipeline

    f, cfg = sdxl_single
    with safe_open(str(f), "pt") as fh:
        keys = set(fh.keys())
    for k in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.positional_embedding",
    ):
        assert k in keys, k
    fam = family_of(tiny_sdxl)
    from_file = load_parts(f, fam.weight_parts, str(cfg))
    from_folder = load_parts(tiny_sdxl, fam.weight_parts)
    for part in fam.weight_parts:
        a, b = from_file[part].state_dict(), from_folder[part].state_dict()
        assert set(a) == set(b), part
        assert all(torch.equal(a[k], b[k]) for k in b), part
    file_img = image_array(load_pipeline(f, str(cfg)))
    assert np.array_equal(file_img, image_array(load_pipeline(tiny_sdxl)))


def test_missing_second_encoder_is_named_before_any_job(tiny_sdxl, sdxl_single, tmp_path):
    from lorapipe.config import ConfigError, check_paths

    for part in ("text_encoder_2", "tokenizer_2"):
        d = tmp_path / f"no-{part}"
        shutil.copytree(tiny_sdxl, d)
        shutil.rmtree(d / part)
        with pytest.raises(FileNotFoundError, match=rf"missing \['{part}'\]"):
            check_model_path(d)
        config = {"datasets": {}, "base_models": {"xl": {"path": str(d)}}, "runs": {}}
        with pytest.raises(ConfigError, match=rf"base_models\.xl\.path: .* \(missing: {part}\)"):
            check_paths(config, tmp_path)
    f, cfg = sdxl_single
    bad = shutil.copytree(cfg, tmp_path / "cfg-no-tok2")
    shutil.rmtree(bad / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=r"lacks \['tokenizer_2'\]"):
        check_config_folder(f, bad)


def test_vae_override_replaces_the_models_vae(tiny_sdxl, sdxl_single, tmp_path):
    """A ``vae:`` folder (as the SDXL fp16-fix VAE is shipped) is loaded instead of the model's
    own VAE, by folder and single file, for encoding and sampling, and has its own digest."""
    import torch

    from lorapipe.models import check_vae_folder, load_pipeline, part_fingerprint
    from lorapipe.tiny import _tiny_vae

    vae_dir = tmp_path / "sdxl-vae-fix"
    _tiny_vae(seed=99).save_pretrained(vae_dir, safe_serialization=True)
    want = _tiny_vae(seed=99).state_dict()
    f, cfg = sdxl_single
    for parts in (load_parts(tiny_sdxl, ("vae", "text_encoder"), vae=vae_dir),
                  load_parts(f, ("vae", "unet"), str(cfg), vae=vae_dir)):  # fmt: skip
        got = parts["vae"].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    own = load_parts(tiny_sdxl, ("vae",))["vae"].state_dict()
    assert not all(torch.equal(own[k], want[k]) for k in want)
    pipe_vae = load_pipeline(tiny_sdxl, vae=str(vae_dir)).vae.state_dict()
    assert all(torch.equal(pipe_vae[k], want[k]) for k in want)
    assert part_fingerprint(tiny_sdxl, "vae", vae_dir) != part_fingerprint(tiny_sdxl, "vae")
    assert check_vae_folder(tiny_sdxl) == tiny_sdxl / "vae"  # a model folder: its vae/ part
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_vae_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="vae override not found"):
        check_vae_folder(tmp_path / "nowhere")


def test_sdxl_datasets_default_to_sdxl_buckets(tiny_sdxl, tiny_model):
    """A dataset without ``resolution`` trained only by SDXL models gets SDXL's 1024² buckets
    in 64-pixel steps (kohya's SDXL buckets); one also trained by SD-1.x, or one that sets its
    resolution, keeps its own."""
    from lorapipe.config import validate
    from lorapipe.images import Bucket, make_buckets

    def resolutions(cfg):
        validate(cfg)
        return {k: v["resolution"] for k, v in cfg["datasets"].items()}

    cfg = {
        "datasets": {"xl": {"path": "a"}, "mixed": {"path": "b"}, "set": {"path": "c",
                                                                          "resolution": 768}},
        "base_models": {"built": {"path": "m", "tiny": {"family": "sdxl"}},
                        "disk": {"path": str(tiny_sdxl)}, "sd": {"path": str(tiny_model)}},
        "defaults": {"base_model": "disk"},
        "runs": {"a": {"dataset": "xl", "base_model": "built"}, "b": {"dataset": "xl"},
                 "c": {"dataset": "mixed"}, "d": {"dataset": "mixed", "base_model": "sd"},
                 "e": {"dataset": "set"}},
    }  # fmt: skip
    assert resolutions(cfg) == {"xl": 1024, "mixed": 512, "set": 768}
    buckets = make_buckets(1024, cfg["datasets"]["xl"]["bucket_step"])
    # SDXL's own training buckets are among them
    for w, h in ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (768, 1344)):
        assert Bucket(w, h) in buckets
