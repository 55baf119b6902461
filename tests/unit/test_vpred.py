"""SD-2.x-style v-prediction: the training target follows the scheduler's prediction_type."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from lorapipe.config import load_config, load_yaml, resolve_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def latents(tmp_path_factory, demo_images, tiny_model) -> list[str]:
    """One latent shard made by the real stage functions from the demo images."""
    from lorapipe.captions import CaptionSettings, caption_shard
    from lorapipe.latents import encode_shard
    from lorapipe.manifest import ScanSettings, list_images, scan_shard, shard_files
    from lorapipe.shards import ShardSettings, write_shard

    d = tmp_path_factory.mktemp("vpred-stages")
    files = list_images(demo_images)
    m, c = d / "m.jsonl", d / "c.jsonl"
    scan_shard(demo_images, shard_files(files, 1, 0), ScanSettings(64, 0.5, 10**8, "#ffffff"), m)
    caption_shard(demo_images, m, CaptionSettings("template", "a {trigger}", "thing"), d / "cc", c)
    write_shard(demo_images, m, c, ShardSettings(64, 16, True, 10**8, "#ffffff"),
                d / "s.tar", d / "s.jsonl")
    encode_shard(d / "s.tar", tiny_model, d / "l.tar")
    return [str(d / "l.tar")]


@pytest.fixture(scope="module")
def vpred_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a v-prediction scheduler (as SD 2.x 768-v ships), same weights."""
    out = tmp_path_factory.mktemp("vpred") / "tiny-v"
    shutil.copytree(tiny_model, out)
    f = out / "scheduler" / "scheduler_config.json"
    cfg = json.loads(f.read_text())
    assert cfg["prediction_type"] == "epsilon"
    f.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}, indent=2))
    return out


def run_config(**over):
    cfg = load_yaml(REPO / "config" / "config.yaml")
    cfg["runs"]["demo"].update(
        {"max_steps": 3, "save_steps": 100, "batch_size": 2, "mixed_precision": "no",
         "compile": False, **over}
    )  # fmt: skip
    load_config(cfg, check_files=False)
    return resolve_run(cfg, "demo")


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def first_step_loss(run, latents, model_path, target: str) -> float:
    """The step-1 loss recomputed outside train.py, with the target written out by formula.

    At step 1 the LoRA B matrices are zero, so the UNet output is the base model's; train.py's
    per-sample draws (`_draw`) and batch order (`epoch_batches`) give the same inputs.
    """
    import torch

    from lorapipe.latents import load_latent_shards
    from lorapipe.models import load_parts, vae_scaling_factor
    from lorapipe.training.batches import draw as _draw
    from lorapipe.training.batches import epoch_batches

    parts = load_parts(model_path, ("unet", "vae", "scheduler"))
    unet, sched = parts["unet"].eval(), parts["scheduler"]
    scaling = vae_scaling_factor(parts["vae"])
    samples = load_latent_shards(latents)
    micro = epoch_batches(samples, run.batch_size, run.seed, 0)[: run.gradient_accumulation]
    n_images = sum(len(b) for b in micro)
    total = 0.0
    for batch in micro:
        per_sample = []
        for i in batch:
            s = samples[i]
            n_t = sched.config.num_train_timesteps
            eps_latent, noise, t, _, _ = _draw(s, run.seed, 0, n_t, run.noise_offset)
            x0 = (s["mean"].float() + torch.exp(0.5 * s["logvar"].float()) * eps_latent) * scaling
            a = sched.alphas_cumprod[t].float()
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
            with torch.no_grad():
                pred = unet(noisy[None], torch.tensor([t]), s["text"].float()[None]).sample[0]
            tgt = noise if target == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            per_sample.append(((pred - tgt) ** 2).mean())
        total += float(torch.stack(per_sample).mean()) * len(batch) / n_images
    return total


def test_v_prediction_trains_on_the_velocity(latents, tiny_model, vpred_model, tmp_path):
    from lorapipe.train import train

    run = run_config()
    assert run.caption_dropout == 0 and not run.min_snr_gamma
    out = {}
    for name, model in (("eps", tiny_model), ("v", vpred_model)):
        train(run, latents, str(model), tmp_path / name, tmp_path / f"ck-{name}", name * 32)
        metrics = read_metrics(tmp_path / name)
        lora = (tmp_path / name / "pytorch_lora_weights.safetensors").read_bytes()
        out[name] = ([m["loss"] for m in metrics], hashlib.sha256(lora).hexdigest())
    (loss_eps, sha_eps), (loss_v, sha_v) = out["eps"], out["v"]
    assert len(loss_eps) == len(loss_v) == 3
    assert all(math.isfinite(x) for x in loss_eps + loss_v)
    assert sha_eps != sha_v
    # Same weights, same draws: step 1 differs only by the target, and each matches its formula
    # (epsilon: the noise; v: sqrt(acp) * noise - sqrt(1 - acp) * x0).
    assert loss_eps[0] != loss_v[0]
    want_eps = first_step_loss(run, latents, tiny_model, "epsilon")
    want_v = first_step_loss(run, latents, vpred_model, "v")
    assert abs(want_eps - want_v) > 1e-2 * want_eps  # the check below can tell them apart
    assert loss_eps[0] == pytest.approx(want_eps, rel=1e-4)
    assert loss_v[0] == pytest.approx(want_v, rel=1e-4)


def test_v_prediction_with_min_snr_weighting(latents, vpred_model, tmp_path):
    from lorapipe.train import train

    run = run_config(min_snr_gamma=5.0, max_steps=2)
    train(run, latents, str(vpred_model), tmp_path / "v", tmp_path / "ck", "c" * 64)
    metrics = read_metrics(tmp_path / "v")
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
