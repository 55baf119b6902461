"""The latent cache streamed from its shards (bounded memory) and batches made ahead: the same
bytes as the in-memory cache, exact resume, damaged shards refused, one text member per caption."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from test_train import make_latents, run_config

from lorapipe.io import CorruptFileError, write_checksum


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def latents(tmp_path_factory, demo_images, tiny_model) -> list[str]:
    """Two latent shards of the demo images, template-captioned (one caption for all)."""
    return make_latents(tmp_path_factory.mktemp("stream"), demo_images, tiny_model)


def test_each_distinct_caption_is_stored_once_per_shard(latents, tiny_model):
    """A shard holds one text member per distinct caption (the template caption is shared by
    most images; sidecars give a few their own), holding what the text encoder gives for it; the
    reloaded samples carry it as ``text``."""
    import torch

    from lorapipe.families import family_of
    from lorapipe.latent_cache import LatentCache
    from lorapipe.models import load_parts

    with tarfile.open(latents[0]) as tf:
        names = tf.getnames()
    texts = [n for n in names if n.startswith("__text__")]
    samples = [n for n in names if n.endswith(".latents.safetensors")]
    cache = LatentCache(latents[:1], ram_mb=0)
    captions = sorted({s["meta"]["caption"] for s in cache.samples})
    assert len(texts) == len(captions) < len(samples) == len(cache.samples)
    assert {s["meta"]["text_ref"] for s in cache.samples} == {t.split(".")[0] for t in texts}
    parts = load_parts(tiny_model, ("text_encoder", "tokenizer"))
    parts["text_encoder"].eval()
    with torch.inference_mode():
        want = dict(zip(captions, family_of(tiny_model).encode_prompts(parts, captions)["text"],
                        strict=True))  # fmt: skip
    for s in cache.samples:
        assert torch.allclose(s["text"], want[s["meta"]["caption"]], atol=1e-6)
    cache.close()


def test_streamed_samples_hold_no_tensors_and_equal_the_in_memory_ones(latents):
    import torch

    from lorapipe.latent_cache import LatentCache

    mem, streamed = LatentCache(latents), LatentCache(latents, ram_mb=0)
    assert mem.in_memory and not streamed.in_memory
    assert [s.key for s in mem.samples] == [s.key for s in streamed.samples]
    assert all(s._tensors is None for s in streamed.samples)  # only the index is held
    for a, b in zip(mem.samples, streamed.samples, strict=True):
        assert a.meta == b.meta
        for k in ("mean", "logvar", "text"):
            assert torch.equal(a[k], b[k]), (a.key, k)
    assert "streamed" in streamed.describe() and "in memory" in mem.describe()
    mem.close()
    streamed.close()


@pytest.mark.parametrize("over", [{}, {"gradient_accumulation": 2, "caption_dropout": 0.3}])
def test_streaming_and_prefetch_train_the_in_memory_bytes(latents, tiny_model, tmp_path, over):
    """A cache above the in-memory threshold (0 MB here) is streamed and batches are made ahead
    in a thread: the LoRA, the metrics and a resumed run are byte for byte the in-memory run's."""
    from lorapipe.train import train

    ref = train(run_config(max_steps=8, **over), latents, str(tiny_model), tmp_path / "ref",
                tmp_path / "cref", "5" * 64)  # fmt: skip
    run = run_config(max_steps=8, latent_cache_ram_mb=0, prefetch=True, **over)
    ck = tmp_path / "ck"
    assert train(run, latents, str(tiny_model), tmp_path / "s", ck, "5" * 64,
                 stop_after=5) == {"stopped_at": 5}  # fmt: skip
    out = train(run, latents, str(tiny_model), tmp_path / "s", ck, "5" * 64)  # resumes at 4
    lora = "pytorch_lora_weights.safetensors"
    assert sha(tmp_path / "s" / lora) == sha(tmp_path / "ref" / lora)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "s", tmp_path / "ref")]  # fmt: skip
    assert losses[0] == losses[1] and out["final_loss"] == ref["final_loss"]


def test_a_damaged_streamed_shard_is_refused_before_training(latents, tmp_path):
    """Streamed, a shard that does not match its checksum is refused (and deleted, to be
    rebuilt); one without a checksum whose sample does not decode is refused naming it."""
    from lorapipe.latent_cache import LatentCache

    bad = tmp_path / "bad.tar"
    data = bytearray(Path(latents[0]).read_bytes())
    bad.write_bytes(bytes(data))
    write_checksum(bad)
    data[3000] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=f"^{bad}: corrupted"):
        LatentCache([str(bad)], ram_mb=0)
    assert not bad.exists()

    # no checksum: each sample is decoded once (and dropped); a broken one names itself
    with tarfile.open(latents[0]) as tf:
        first = next(m for m in tf.getmembers() if m.name.endswith(".latents.safetensors"))
        offset = first.offset_data
    data = bytearray(Path(latents[0]).read_bytes())
    data[offset : offset + 8] = b"\xff" * 8  # the safetensors header length
    nosum = tmp_path / "nosum.tar"
    nosum.write_bytes(bytes(data))
    key = first.name.split(".")[0]
    with pytest.raises(CorruptFileError, match=rf"^{nosum}: cannot be decoded \(sample {key}: "):
        LatentCache([str(nosum)], ram_mb=0)
