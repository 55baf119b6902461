"""SDXL training through the family seam: the latent cache's two text outputs, the size
conditioning the UNet gets, caption dropout, exact resume, v-prediction with a zero-terminal-SNR
schedule, and LoRA on both text encoders at their own learning rates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_train import run_config, sha

from lorapipe.captions import CaptionSettings, caption_shard
from lorapipe.manifest import ScanSettings, list_images, scan_shard, shard_files
from lorapipe.shards import ShardSettings, write_shard

XL = {"mixed_precision": "no", "compile": False, "batch_size": 2}


@pytest.fixture(scope="module")
def xl_latents(tmp_path_factory, demo_images, tiny_sdxl) -> list[str]:
    """Two latent shards of the demo images, encoded by the real stages for the tiny SDXL."""
    from lorapipe.latents import encode_shard

    d = tmp_path_factory.mktemp("xl-stages")
    files = list_images(demo_images)
    out = []
    for k in range(2):
        m, c = d / f"m{k}.jsonl", d / f"c{k}.jsonl"
        scan_shard(
            demo_images, shard_files(files, 2, k), ScanSettings(64, 0.5, 10**8, "#ffffff"), m
        )
        caption_shard(demo_images, m, CaptionSettings("template", "a {trigger}", "thing"),
                      d / "cc", c)  # fmt: skip
        write_shard(demo_images, m, c, ShardSettings(64, 16, True, 10**8, "#ffffff"),
                    d / f"s{k}.tar", d / f"s{k}.jsonl")  # fmt: skip
        encode_shard(d / f"s{k}.tar", tiny_sdxl, d / f"l{k}.tar")
        out.append(str(d / f"l{k}.tar"))
    return out


def cache_of(paths):
    from lorapipe.latent_cache import LatentCache

    return LatentCache(list(paths))


def test_cache_holds_both_outputs_once_per_caption(xl_latents, tiny_sdxl):
    import tarfile

    import torch

    from lorapipe.families import family_of
    from lorapipe.models import load_parts

    cache = cache_of(xl_latents)
    assert set(cache.empty) == {"text", "pooled"}
    fam = family_of(tiny_sdxl)
    parts = load_parts(tiny_sdxl, fam.text_parts)
    captions = sorted({s["meta"]["caption"] for s in cache.samples})
    with torch.inference_mode():
        want = fam.encode_prompts(parts, captions + [""])
    for s in cache.samples:
        j = captions.index(s["meta"]["caption"])  # (batched with other prompts: ~1 ulp)
        assert torch.allclose(s["text"], want["text"][j], atol=1e-6)
        assert torch.allclose(s["pooled"], want["pooled"][j], atol=1e-6)
    assert torch.allclose(cache.empty["pooled"], want["pooled"][-1], atol=1e-6)
    for p in xl_latents:  # one text member per distinct caption of the shard, not per image
        with tarfile.open(p) as tf:
            names = tf.getnames()
        n_text = sum(n.startswith("__text__") for n in names)
        n_samples = sum(n.endswith(".latents.safetensors") for n in names)
        assert n_text < n_samples


def test_caption_dropout_drops_pooled_too(xl_latents, tiny_sdxl):
    import torch

    from lorapipe.models import load_parts
    from lorapipe.training.batches import BatchRecipe, host_batch

    cache = cache_of(xl_latents)
    sched = load_parts(tiny_sdxl, ("scheduler",))["scheduler"]
    empty = {k: v.float() for k, v in cache.empty.items()}
    size = cache.samples[0]["meta"]["size"]  # one bucket: a batch never mixes sizes
    idx = [i for i, x in enumerate(cache.samples) if x["meta"]["size"] == size][:3]
    for p_drop, expect_empty in ((1.0, True), (0.0, False)):
        r = BatchRecipe(0, sched, "epsilon", 0.13, 0.0, p_drop, empty, False)
        hb = host_batch(cache.samples, idx, 0, r)
        assert set(hb.cond) == {"text", "pooled"}
        for j, i in enumerate(idx):
            for k in ("text", "pooled"):
                ref = empty[k] if expect_empty else cache.samples[i][k].float()
                assert torch.equal(hb.cond[k][j], ref), (p_drop, k)


def test_unet_gets_pooled_text_and_the_shard_time_ids(xl_latents, tiny_sdxl, tmp_path, monkeypatch):
    """Every UNet call of training gets ``added_cond_kwargs``: ``time_ids`` equal to the
    batch's shard records (`families.sdxl.time_ids`), ``text_embeds`` of its captions."""
    from diffusers import UNet2DConditionModel

    from lorapipe.families.sdxl import time_ids
    from lorapipe.train import train

    seen = []
    real = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *a, **kw):
        seen.append((encoder_hidden_states.detach().clone(), kw.get("added_cond_kwargs")))
        return real(self, sample, timestep, encoder_hidden_states, *a, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    run = run_config(**XL, max_steps=3, save_steps=100, caption_dropout=0.0)
    train(run, xl_latents, str(tiny_sdxl), tmp_path / "o", tmp_path / "c", "t" * 64)
    cache = cache_of(xl_latents)
    by_pooled = {}
    for s in cache.samples:
        by_pooled.setdefault(tuple(s["pooled"].tolist()), []).append(time_ids(s["meta"]))
    assert seen
    for text, added in seen:
        assert added is not None and set(added) == {"text_embeds", "time_ids"}
        assert added["time_ids"].shape == (text.shape[0], 6)
        assert added["text_embeds"].shape == (text.shape[0], 24)
        for pooled, ids in zip(added["text_embeds"], added["time_ids"], strict=True):
            assert [int(x) for x in ids] in by_pooled[tuple(pooled.tolist())]
    assert any(int(ids[2]) or int(ids[3]) for _, a in seen for ids in a["time_ids"])  # crops


def test_sdxl_same_bytes_and_exact_resume(xl_latents, tiny_sdxl, tmp_path):
    """Same config twice: same bytes; stopped and resumed: the uninterrupted run's bytes; the
    step exports have sd-scripts' SDXL names."""
    from safetensors import safe_open

    from lorapipe.train import train

    run = run_config(**XL, epochs=1, save_steps=3)
    ref = train(run, xl_latents, str(tiny_sdxl), tmp_path / "ref", tmp_path / "cr", "x" * 64)
    again = train(run, xl_latents, str(tiny_sdxl), tmp_path / "b", tmp_path / "cb", "x" * 64)
    f = "pytorch_lora_weights.safetensors"
    assert sha(tmp_path / "ref" / f) == sha(tmp_path / "b" / f)
    assert ref["steps"] == again["steps"] > 3
    ck = tmp_path / "ck"
    assert train(run, xl_latents, str(tiny_sdxl), tmp_path / "x", ck, "x" * 64, stop_after=4) == {
        "stopped_at": 4
    }
    train(run, xl_latents, str(tiny_sdxl), tmp_path / "x", ck, "x" * 64)
    assert sha(tmp_path / "x" / f) == sha(tmp_path / "ref" / f)
    metrics = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] == m["loss"] for m in metrics)  # finite
    (kohya,) = (ck / ("x" * 16) / "exports" / "step-000003").glob("demo-step*.safetensors")
    with safe_open(str(kohya), "pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    assert meta["ss_steps"] == "3"


@pytest.fixture(scope="module")
def vpred_zsnr(tiny_sdxl, tmp_path_factory) -> Path:
    """The tiny SDXL with a v-prediction, zero-terminal-SNR scheduler config (rescaled betas,
    trailing timesteps, as v-prediction SDXL derivatives ship), same weights."""
    out = tmp_path_factory.mktemp("xl-v") / "tiny-xl-v"
    shutil.copytree(tiny_sdxl, out)
    f = out / "scheduler" / "scheduler_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(prediction_type="v_prediction", rescale_betas_zero_snr=True,
               timestep_spacing="trailing")  # fmt: skip
    f.write_text(json.dumps(cfg, indent=2))
    return out


def test_vpred_zero_terminal_snr_is_read_from_the_model_and_trains(
    vpred_zsnr, xl_latents, tmp_path
):
    import torch

    from lorapipe.models import load_parts
    from lorapipe.train import train
    from lorapipe.training.batches import Batch, BatchRecipe, diffusion_loss

    sched = load_parts(vpred_zsnr, ("scheduler",))["scheduler"]
    assert sched.config.prediction_type == "v_prediction"
    assert float(sched.alphas_cumprod[-1]) == 0.0  # zero terminal SNR, from the config
    run = run_config(**XL, max_steps=3, save_steps=100, min_snr_gamma=5.0)
    out = train(run, xl_latents, str(vpred_zsnr), tmp_path / "v", tmp_path / "cv", "v" * 64)
    metrics = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert out["steps"] == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    # min-SNR at the last timestep (SNR 0) is finite for both targets
    t = torch.tensor([999, 500])
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    for kind in ("epsilon", "v_prediction"):
        r = BatchRecipe(0, sched, kind, 0.13, 0.0, 0.0, {}, False)
        loss = diffusion_loss(pred, Batch(None, t, target, None, None, []), r, 5.0)
        assert torch.isfinite(loss).all(), kind


def test_both_text_encoders_trained_at_their_own_rates(xl_latents, tiny_sdxl, tmp_path):
    """train_text_encoder on SDXL: a LoRA on each encoder, each at its own learning rate, in
    both exported files, reloading in StableDiffusionXLPipeline; resumed bit-exact."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from lorapipe.train import train

    over = {**XL, "train_text_encoder": True, "text_encoder_lr": 5e-4, "text_encoder_2_lr": 1e-4,
            "epochs": 1, "save_steps": 2, "caption_dropout": 0.2}  # fmt: skip
    run = run_config(**over)
    train(run, xl_latents, str(tiny_sdxl), tmp_path / "ref", tmp_path / "cr", "e" * 64)
    ck = tmp_path / "ck"
    train(run, xl_latents, str(tiny_sdxl), tmp_path / "x", ck, "e" * 64, stop_after=3)
    opt = torch.load(ck / ("e" * 16) / "step-000002" / "optimizer.pt", weights_only=True)
    assert [g["lr"] for g in opt["param_groups"]] == [run.learning_rate, 5e-4, 1e-4]
    train(run, xl_latents, str(tiny_sdxl), tmp_path / "x", ck, "e" * 64)
    f = "pytorch_lora_weights.safetensors"
    assert sha(tmp_path / "x" / f) == sha(tmp_path / "ref" / f)
    with safe_open(str(tmp_path / "ref" / f), "pt") as fh:
        assert {k.split(".")[0] for k in fh.keys()} == {"unet", "text_encoder", "text_encoder_2"}
    (kohya,) = (ck / ("e" * 16) / "exports" / "step-000002").glob("demo-step*.safetensors")
    with safe_open(str(kohya), "pt") as fh:
        assert {k.split("_")[1] for k in fh.keys()} == {"unet", "te1", "te2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe("a thing", num_inference_steps=2, height=64, width=64, generator=g,
                    output_type="np").images[0]  # fmt: skip

    base = image()
    pipe.load_lora_weights(str(tmp_path / "ref"))
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert not np.array_equal(image(), base)


def test_sdxl_two_processes_match_one_with_the_same_global_batch(xl_latents, tiny_sdxl, tmp_path):
    """Data-parallel SDXL (2 real gloo processes, each its half of every global batch, with
    its samples' size ids and pooled text) trains the LoRA one process trains (test_ddp's
    tolerance: summation order differs), and rank 0 alone writes."""
    import torch
    from safetensors.torch import load_file

    from lorapipe.train import train

    # adam_epsilon as test_ddp: Adam's sign-like update at tiny gradients would amplify the
    # last-bit differences of a different summation order
    one = run_config(**{**XL, "batch_size": 4}, max_steps=3, save_steps=2, adam_epsilon=1e-6)
    two = run_config(**{**XL, "batch_size": 2}, max_steps=3, save_steps=2, adam_epsilon=1e-6,
                     num_processes=2)
    s1 = train(one, xl_latents, str(tiny_sdxl), tmp_path / "one", tmp_path / "c1", "d" * 64)
    s2 = train(two, xl_latents, str(tiny_sdxl), tmp_path / "two", tmp_path / "c2", "d" * 64)
    assert (s1["processes"], s2["processes"], s1["steps"], s2["steps"]) == (1, 2, 3, 3)
    f = "pytorch_lora_weights.safetensors"
    a, b = load_file(tmp_path / "one" / f), load_file(tmp_path / "two" / f)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), k
    assert any(k.endswith("lora.up.weight") and a[k].abs().max() > 1e-4 for k in a)
    assert [p.name for p in (tmp_path / "c2").iterdir()] == ["d" * 16 + "-x2"]
