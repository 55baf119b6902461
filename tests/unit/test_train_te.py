"""Text-encoder LoRA (train_text_encoder): prompt choice, training, both exports, exact resume."""

from __future__ import annotations

import json

import pytest
from test_export import lora_scalings, read, render  # the export tests' own helpers
from test_train import run_config, sha

from lorapipe.captions import CaptionSettings, VariantSettings, caption_shard
from lorapipe.manifest import ScanSettings, list_images, scan_shard
from lorapipe.shards import ShardSettings, write_shard

RANK, ALPHA, TE_LR = 4, 8.0, 5e-4  # the demo run's rank and alpha (alpha != rank on purpose)
TE_RUN = {"train_text_encoder": True, "text_encoder_lr": TE_LR, "caption_dropout": 0.3,
          "epochs": 2, "save_steps": 3, "lora_rank": RANK, "lora_alpha": ALPHA}  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_images, tiny_model) -> dict[str, str]:
    """Latent shards of 8 demo images with tag captions: without and with caption variants."""
    from lorapipe.latents import encode_shard

    d = tmp_path_factory.mktemp("te")
    files = list_images(demo_images)[:8]
    scan_shard(demo_images, files, ScanSettings(64, 0.5, 10**8, "#ffffff"), d / "m.jsonl")
    overrides = {f: f"thing, red, blue, green, {i}" for i, f in enumerate(files)}
    caption_shard(demo_images, d / "m.jsonl", CaptionSettings("template", "a {trigger}", "x"),
                  d / "cc", d / "c.jsonl", overrides=overrides)  # fmt: skip
    shard = ShardSettings(64, 16, True, 10**8, "#ffffff")
    write_shard(demo_images, d / "m.jsonl", d / "c.jsonl", shard, d / "s.tar", d / "s.jsonl")
    encode_shard(d / "s.tar", tiny_model, d / "plain.tar")
    variants = VariantSettings(caption_variants=3, shuffle_captions=True, keep_tokens=1)
    encode_shard(d / "s.tar", tiny_model, d / "variants.tar", variants=variants)
    return {"plain": str(d / "plain.tar"), "variants": str(d / "variants.tar")}


@pytest.fixture(scope="module")
def te_run(shards, tiny_model, tmp_path_factory) -> dict:
    """One uninterrupted run with the text encoder trained (variants and caption dropout)."""
    from lorapipe.train import train

    d = tmp_path_factory.mktemp("te_run")
    run = run_config(**TE_RUN)
    summary = train(run, [shards["variants"]], str(tiny_model), d / "out", d / "ck", "e" * 64)
    return {"run": run, "out": d / "out", "ck": d / "ck" / ("e" * 16), "summary": summary}


def test_prompt_text_is_the_cached_choice(shards, tiny_model):
    """The text-encoder path picks the prompt the cached path picks (same draw): encoded by the
    untrained text encoder, it is the cached tensor (caption, variant or empty prompt)."""
    import torch

    from lorapipe.families import family_of
    from lorapipe.latents import load_latent_cache
    from lorapipe.models import load_parts
    from lorapipe.training.batches import caption_tensor as _caption_tensor
    from lorapipe.training.batches import caption_text as _caption_text
    from lorapipe.training.batches import draw as _draw

    parts = load_parts(tiny_model, ("text_encoder", "tokenizer"))
    kinds = set()
    for cache in ("plain", "variants"):
        samples, empty = load_latent_cache([shards[cache]])
        texts, cached = [], []
        for epoch in range(3):
            for s in samples:
                *_, drop, g = _draw(s, 0, epoch, 1000, 0.0)
                cached.append(_caption_tensor(s, drop, 0.3, empty.float(), g))
                *_, drop2, g2 = _draw(s, 0, epoch, 1000, 0.0)
                texts.append(_caption_text(s, drop2, 0.3, g2))
                variants = s["meta"].get("caption_variants") or []
                t = texts[-1]
                kinds.add("" if not t else "variant" if t in variants else "caption")
        with torch.inference_mode():
            parts["text_encoder"].eval()
            got = family_of(tiny_model).encode_prompts(parts, texts)["text"]
        assert torch.allclose(got, torch.stack(cached), atol=1e-5), cache
    assert kinds == {"", "variant", "caption"}


def test_text_encoder_lora_trains_and_both_files_carry_it(te_run, tiny_model):
    from lorapipe.export import export_kohya, read_alpha

    # the checkpoint holds the text-encoder LoRA; peft's gaussian init has lora_B = 0 (A random)
    last = sorted(te_run["ck"].glob("step-*"))[-1]
    te_ckpt, _ = read(last / "lora_te.safetensors")
    ups = [v for k, v in te_ckpt.items() if ".lora_B." in k]
    assert ups and all(v.abs().max() > 0 for v in ups)
    assert {k.split(".")[-3] for k in te_ckpt} == {"q_proj", "k_proj", "v_proj", "out_proj"}

    diffusers_file = te_run["out"] / "pytorch_lora_weights.safetensors"
    tensors, meta = read(diffusers_file)
    assert any(k.startswith("unet.") for k in tensors)
    te_keys = [k for k in tensors if k.startswith("text_encoder.")]
    assert len(te_keys) == len(te_ckpt)
    cfg = json.loads(meta["lora_adapter_metadata"])
    # the scale alpha / r is in the up weights: the metadata says alpha = r (issue 14)
    assert (cfg["text_encoder.lora_alpha"], cfg["text_encoder.r"]) == (RANK, RANK)
    assert read_alpha(meta, "text_encoder") == (ALPHA, RANK)
    metrics = [json.loads(x) for x in (te_run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["lr_text_encoder"] == TE_LR

    kohya_file = te_run["out"] / "demo.safetensors"
    export_kohya(diffusers_file, kohya_file, te_run["run"].to_dict(), {})
    sd, kmeta = read(kohya_file)
    te_modules = {k.split(".")[0] for k in sd if k.startswith("lora_te_")}
    assert len(te_modules) * 2 == len(te_keys)
    for m in te_modules:
        assert m.startswith("lora_te_text_model_encoder_layers_")
        assert sd[f"{m}.alpha"].item() == ALPHA  # the trained alpha, not the rank
        assert sd[f"{m}.lora_down.weight"].shape[0] == RANK
    for key in te_keys:  # module for module, the diffusers file's weights (kohya names start
        # at CLIPTextModel.text_model, a level transformers 5 no longer has)
        module, kind = key.removeprefix("text_encoder.").rsplit(".lora_linear_layer.", 1)
        module = module if module.startswith("text_model.") else "text_model." + module
        kohya = {"down.weight": "lora_down.weight", "up.weight": "lora_up.weight"}[kind]
        want = tensors[key] / (ALPHA / RANK) if kind == "up.weight" else tensors[key]
        assert sd[f"lora_te_{module.replace('.', '_')}.{kohya}"].equal(want)
    assert kmeta["ss_text_encoder_lr"] == str(TE_LR)
    assert kmeta["ss_unet_lr"] == str(te_run["run"].learning_rate)

    # every saved step's exports carry the text encoder too
    step_dir = te_run["ck"] / "exports" / last.name
    step_diffusers, _ = read(step_dir / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in step_diffusers)
    (kohya_step,) = [p for p in step_dir.glob("demo-step*.safetensors")]
    sd_step, meta_step = read(kohya_step)
    assert any(k.startswith("lora_te_") for k in sd_step)
    assert meta_step["ss_text_encoder_lr"] == str(TE_LR)


def test_kohya_file_gives_the_diffusers_image(te_run, tiny_model):
    """diffusers loads the kohya file (text encoder included, at alpha / rank) to the image the
    diffusers file gives, and that image is not the base model's."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    diffusers_file = te_run["out"] / "pytorch_lora_weights.safetensors"
    kohya_file = te_run["out"] / "demo-kohya.safetensors"
    from lorapipe.export import export_kohya

    export_kohya(diffusers_file, kohya_file, te_run["run"].to_dict(), {})
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    images = {}
    for f in (diffusers_file, kohya_file):
        pipe.load_lora_weights(str(f.parent), weight_name=f.name)
        te_scalings = lora_scalings(pipe.text_encoder)
        want = ALPHA / RANK if f == kohya_file else 1.0  # diffusers file: scale in the weights
        assert te_scalings and set(te_scalings) == {want}, f.name
        images[f.name] = render(pipe)
        pipe.unload_lora_weights()
    d, k = images[diffusers_file.name], images[kohya_file.name]
    assert np.abs(d - k).max() < 1e-3
    assert np.abs(d - base).max() > 0.01


def test_resume_with_the_text_encoder_is_bit_exact(te_run, shards, tiny_model, tmp_path):
    from lorapipe.train import train

    run, ck = te_run["run"], tmp_path / "ck"
    args = (run, [shards["variants"]], str(tiny_model), tmp_path / "out", ck, "e" * 64)
    assert train(*args, stop_after=4) == {"stopped_at": 4}  # checkpoint at 3; step 4 redone
    assert (ck / ("e" * 16) / "step-000003" / "lora_te.safetensors").is_file()
    out = train(*args)
    assert out["steps"] == te_run["summary"]["steps"]
    name = "pytorch_lora_weights.safetensors"
    assert sha(tmp_path / "out" / name) == sha(te_run["out"] / name)  # UNet and text encoder
    last = sorted(te_run["ck"].glob("step-*"))[-1].name
    for f in ("lora.safetensors", "lora_te.safetensors"):
        assert sha(ck / ("e" * 16) / last / f) == sha(te_run["ck"] / last / f), f


def test_text_encoder_is_loaded_only_when_trained(shards, tiny_model, tmp_path, loaded_parts):
    """Without train_text_encoder the cached text is used: no text encoder loaded (the cache has
    the empty prompt); with it, the text encoder is loaded and trained."""
    from lorapipe.train import train

    loaded = loaded_parts
    for i, te in enumerate((False, True)):
        run = run_config(max_steps=1, caption_dropout=0.5, train_text_encoder=te)
        out, ck = tmp_path / f"o{i}", tmp_path / f"c{i}"
        train(run, [shards["plain"]], str(tiny_model), out, ck, "d" * 64)
        assert ("text_encoder" in loaded[-1]) is te and "unet" in loaded[-1]
    tensors, _ = read(tmp_path / "o0" / "pytorch_lora_weights.safetensors")
    assert not any(k.startswith("text_encoder.") for k in tensors)
