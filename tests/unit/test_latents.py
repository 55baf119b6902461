"""Latent cache: caption variants, the cached empty prompt, stored dtype, reproducible bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lorapipe.captions import CaptionSettings, VariantSettings, caption_shard, caption_variant
from lorapipe.manifest import ScanSettings, list_images, scan_shard
from lorapipe.shards import ShardSettings, write_shard

VARIANTS = VariantSettings(caption_variants=3, shuffle_captions=True, keep_tokens=1)


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def image_shard(tmp_path_factory, demo_images) -> Path:
    """One image shard of the demo images, captioned with comma-separated tags."""
    files = list_images(demo_images)[:6]
    overrides = {f: f"thing, red, blue, green, square, {i}" for i, f in enumerate(files)}
    return make_shard(tmp_path_factory.mktemp("lat"), demo_images, overrides)


def make_shard(d: Path, demo_images: Path, overrides: dict) -> Path:
    """An image shard of the first 6 demo images in ``d``: template captions "a x" where
    ``overrides`` (and the demo's sidecar .txt files) give none."""
    files = list_images(demo_images)[:6]
    scan_shard(demo_images, files, ScanSettings(64, 0.5, 10**8, "#ffffff"), d / "m.jsonl")
    caption_shard(demo_images, d / "m.jsonl", CaptionSettings("template", "a {trigger}", "x"),
                  d / "cc", d / "c.jsonl", overrides=overrides)
    write_shard(demo_images, d / "m.jsonl", d / "c.jsonl",
                ShardSettings(64, 16, True, 10**8, "#ffffff"), d / "s.tar", d / "s.jsonl")
    return d / "s.tar"


@pytest.fixture(scope="module")
def encoded(image_shard, tiny_model):
    from lorapipe.latents import encode_shard

    out = image_shard.with_name("l.tar")
    encode_shard(image_shard, tiny_model, out, batch_size=4, checksum=True, variants=VARIANTS)
    return out


def encode_text(model: Path, prompts: list[str]):
    import torch

    from lorapipe.models import load_parts

    parts = load_parts(model, ("text_encoder", "tokenizer"))
    tok = parts["tokenizer"]
    with torch.inference_mode():
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        return parts["text_encoder"].eval()(ids)[0]


def test_variants_are_the_encodings_of_reproducible_tag_shuffles(encoded, tiny_model):
    import torch

    from lorapipe.latents import load_latent_cache

    samples, empty = load_latent_cache([str(encoded)])
    index = encoded.with_name("s.jsonl").read_text().splitlines()
    assert len(samples) == len(index) >= 4
    s = samples[0]
    L, D = s["text"].shape
    assert s["text_variants"].shape == (3, L, D)
    texts = s["meta"]["caption_variants"]
    assert texts == [caption_variant(s["meta"]["caption"], s["key"], k, VARIANTS) for k in range(3)]
    assert all(t.startswith("thing, ") for t in texts)  # keep_tokens=1
    assert len(set(texts)) > 1 and s["meta"]["caption"] not in texts
    ref = encode_text(tiny_model, texts)
    torch.testing.assert_close(s["text_variants"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["text"], encode_text(tiny_model, [s["meta"]["caption"]])[0],
                               rtol=1e-5, atol=1e-5)
    # the empty prompt, tokenised exactly as training tokenises it
    from lorapipe.models import load_parts

    parts = load_parts(tiny_model, ("text_encoder", "tokenizer"))
    tok = parts["tokenizer"]
    with torch.inference_mode():
        ids = tok([""], padding="max_length", max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        want = parts["text_encoder"].eval()(ids)[0][0]
    assert empty.shape == (L, D) and torch.equal(empty, want)


def test_same_inputs_same_bytes_and_old_api(encoded, image_shard, tiny_model, tmp_path):
    from lorapipe.latents import encode_shard, load_latent_shards

    again = tmp_path / "l.tar"
    encode_shard(image_shard, tiny_model, again, batch_size=4, checksum=True, variants=VARIANTS)
    assert sha(again) == sha(encoded)
    samples = load_latent_shards([str(again)])
    assert isinstance(samples, list) and {"mean", "logvar", "text", "meta"} <= set(samples[0])
    # another variant setting is another file
    other = tmp_path / "o.tar"
    encode_shard(image_shard, tiny_model, other, batch_size=4,
                 variants=VariantSettings(caption_variants=3, shuffle_captions=True, keep_tokens=2))
    assert sha(other) != sha(encoded)


def test_bfloat16_cache_and_no_variants(image_shard, tiny_model, tmp_path):
    import torch

    from lorapipe.latents import encode_shard, load_latent_cache

    out = tmp_path / "bf.tar"
    encode_shard(image_shard, tiny_model, out, batch_size=4, dtype="bfloat16")
    samples, empty = load_latent_cache([str(out)])
    assert "text_variants" not in samples[0]
    assert {samples[0][k].dtype for k in ("mean", "logvar", "text")} == {torch.bfloat16}
    assert empty.dtype == torch.bfloat16 and samples[0]["meta"]["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="float16"):
        encode_shard(image_shard, tiny_model, tmp_path / "x.tar", dtype="float16")


def test_shards_of_different_text_encoders_are_refused(encoded, image_shard, tmp_path):
    from lorapipe.io import CorruptFileError
    from lorapipe.latents import encode_shard, load_latent_cache
    from lorapipe.tiny import build_tiny_model

    other_model = build_tiny_model(tmp_path / "m2", seed=1)
    other = tmp_path / "l2.tar"
    encode_shard(image_shard, other_model, other, batch_size=4)
    with pytest.raises(CorruptFileError, match="empty-prompt"):
        load_latent_cache([str(encoded), str(other)])


def test_a_shard_without_empty_prompt_loads_with_none(encoded, tmp_path):
    """Latent shards written before the empty prompt was stored still load."""
    old = without_empty_prompt(encoded, tmp_path / "old.tar")
    from lorapipe.latents import load_latent_cache, load_latent_shards

    samples, empty = load_latent_cache([str(old)])
    assert empty is None and len(samples) == len(load_latent_shards([str(encoded)]))


def without_empty_prompt(src_tar: Path, dst: Path) -> Path:
    """A copy of a latent shard as written before the empty prompt was stored."""
    import tarfile

    with tarfile.open(src_tar) as src, tarfile.open(dst, "w") as out:
        for m in src.getmembers():
            if not m.name.startswith("__empty__"):
                out.addfile(m, src.extractfile(m))
    return dst


def test_caption_tensor_picks_variants_from_the_sample_generator():
    import torch

    from lorapipe.training.batches import caption_tensor as _caption_tensor

    text, empty = torch.zeros(2, 3), torch.full((2, 3), -1.0)
    variants = torch.stack([torch.full((2, 3), float(k + 1)) for k in range(3)])
    with_v = {"text": text, "text_variants": variants}
    picks = {
        float(_caption_tensor(with_v, 0.9, 0.1, empty, torch.Generator().manual_seed(i))[0, 0])
        for i in range(40)
    }
    assert picks == {1.0, 2.0, 3.0}  # every variant, never the caption as written
    assert torch.equal(_caption_tensor(with_v, 0.05, 0.1, empty, torch.Generator()), empty)
    # without variants: the caption, and the generator is not touched (bit-exact old runs)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(_caption_tensor({"text": text}, 0.9, 0.1, empty, g), text)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())


def test_training_uses_variants_and_the_cached_empty_prompt(
    encoded, image_shard, tiny_model, tmp_path, loaded_parts
):
    """Training takes the empty prompt from the cache (no text encoder loaded) with the same
    bytes as encoding it, and a cache with caption variants trains another LoRA."""
    from lorapipe.config import load_config, load_yaml, resolve_run
    from lorapipe.latents import encode_shard
    from lorapipe.train import train

    cfg = load_yaml(Path(__file__).resolve().parents[2] / "config" / "config.yaml")
    cfg["runs"]["demo"].update(
        {"epochs": 2, "save_steps": 100, "batch_size": 2, "caption_dropout": 0.5}
    )
    load_config(cfg, check_files=False)
    run = resolve_run(cfg, "demo")
    plain = tmp_path / "plain.tar"
    encode_shard(image_shard, tiny_model, plain, batch_size=4)
    old = without_empty_prompt(plain, tmp_path / "old.tar")

    loaded = loaded_parts

    def lora(name, shard):
        train(run, [str(shard)], str(tiny_model), tmp_path / name, tmp_path / f"c{name}", "f" * 64)
        return sha(tmp_path / name / "pytorch_lora_weights.safetensors")

    cached = lora("cached", plain)
    assert "text_encoder" not in loaded[-1] and "unet" in loaded[-1]
    encoded_now = lora("old", old)
    assert "text_encoder" in loaded[-1]
    assert cached == encoded_now
    assert lora("variants", encoded) != cached


def test_each_distinct_caption_is_encoded_once(tmp_path, demo_images, tiny_model, monkeypatch):
    """Template captions ("a x" for every image without a sidecar .txt): the text encoder runs
    once per distinct caption (and the empty prompt), not once per image; each sample's cached
    text is its caption's own encoding."""
    import torch

    from lorapipe import latents

    shard = make_shard(tmp_path, demo_images, overrides={})
    seen: list[list[str]] = []
    real = latents._Encoders.text
    monkeypatch.setattr(latents._Encoders, "text",
                        lambda self, prompts: seen.append(list(prompts)) or real(self, prompts))
    out = tmp_path / "l.tar"
    n = latents.encode_shard(shard, tiny_model, out, batch_size=2)
    assert n >= 4  # (the demo's broken image may be among them)
    samples, _ = latents.load_latent_cache([str(out)])
    captions = [s["meta"]["caption"] for s in samples]
    assert len(samples) == n and "a x" in captions and len(set(captions)) < n
    flat = [p for call in seen for p in call]
    assert sorted(flat) == sorted({"", *captions})  # each distinct prompt once
    for s in samples:
        assert torch.equal(s["text"], encode_text(tiny_model, [s["meta"]["caption"]])[0])
