"""Data-wait share of a LoRA training step: cached latents vs encoding on the fly (same run).

Both paths feed the same peft LoRA UNet, the same batches of the same image shards, in one
process, alternating step by step (cached, on-the-fly, on-the-fly, cached, ...) so that load
from other processes hits both alike. Per step two times are taken:

- **data**: getting the batch ready, as lorapipe.train's loop does it in-line (no prefetch workers):
  - *cached*: the latent shards (``lorapipe.latents.encode_shard``, read once before the loop with
    ``load_latent_cache``) give mean/logvar and the text-encoder output; a fresh latent is drawn
    (``lorapipe.training.batches.draw``), scaled, stacked, noised (``add_noise``);
  - *on the fly*: the next images are decoded from the image shard tars
    (``lorapipe.shards.read_samples``: WebDataset + PNG), VAE-encoded (a latent drawn from the
    posterior), captions tokenised and text-encoded, then stacked and noised the same way;
- **compute**: forward, fp32 MSE, backward, grad clipping, AdamW step, zero_grad (fp32, as
  lorapipe.train on CPU).

data share = data / (data + compute), per step (median reported) and over all timed steps.

Two sizes: ``tiny`` (the workflow's tiny-sd model from ``lorapipe.tiny``, 64 px, batch 4) and
``sd15`` (SD-1.5's UNet, VAE and CLIP-L text encoder architectures with random weights, 128 px
= 16x16 latents, batch 1; the tokenizer is lorapipe.tiny's offline one, so captions tokenise to
fewer, but still 77 padded, tokens). The image shards are made from a seeded dataset
(bench_shards' generator) with ``lorapipe.manifest.scan_shard`` and ``lorapipe.shards.write_shard``
(square crop); everything is cached under bench/out/datawait/.

Per-job start-up: fresh interpreters running ``import torch, diffusers``,
``import lorapipe.manifest`` and ``pass`` (median of ``--import-repeats``), set against the
work of one shard of this run: ``encode_shard`` (the torch stage: model load + encode) and
``scan_shard`` (a light stage).

    python bench/bench_datawait.py [--quick] [--sizes tiny,sd15] [--steps 8] [--images 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load_average, median, out_dir, table, write_result  # noqa: E402

sys.path.insert(0, str(REPO / "src"))

MAX_PIXELS, BACKGROUND = 178956970, "#ffffff"
CAPTION = "a picture in lorapipe style, number {i}, with a house and a tree"
SIZES = {
    # name: (resolution px, batch size)
    "tiny": (64, 4),
    "sd15": (128, 1),
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD15_TEXT = {  # CLIP ViT-L/14 text tower, as in SD-1.5
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
MODEL_VERSION = 1  # bump when the model folders' contents change


# ---------------------------------------------------------------- models and data
def tiny_model(work: Path) -> Path:
    from lorapipe.tiny import build_tiny_model

    path = work / "tiny-sd"
    if not (path / "model_index.json").exists():
        build_tiny_model(path, seed=0)
    return path


def sd15_model(work: Path, tiny: Path, name: str = "sd15-shaped", unet_weights: bool = False,
               version: int = MODEL_VERSION) -> Path:  # fmt: skip
    """An SD-1.5-shaped diffusers folder ``work/name`` with random weights: VAE and text
    encoder saved, the tokenizer and scheduler copied from the tiny model, the UNet as config
    only (encode_shard loads no UNet; the benchmark builds the UNet in memory) unless
    ``unet_weights`` (seed 10; bench_vs_script trains it). Kept while its ``.complete`` stamp
    says ``version``."""
    import shutil

    import torch
    from bench_train_step import SD15_UNET
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorapipe.tiny import SPECIAL_TOKENS, tokenizer_files

    path = work / name
    stamp = path / ".complete"
    if stamp.exists() and stamp.read_text() == str(version):
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(tiny / part, path / part)
    shutil.copy(tiny / "model_index.json", path / "model_index.json")
    if unet_weights:
        torch.manual_seed(10)
        UNet2DConditionModel(**SD15_UNET).save_pretrained(path / "unet", safe_serialization=True)
    torch.manual_seed(11)
    AutoencoderKL(**SD15_VAE).save_pretrained(path / "vae", safe_serialization=True)
    vocab, _ = tokenizer_files()
    torch.manual_seed(12)
    te = CLIPTextModel(
        CLIPTextConfig(
            **SD15_TEXT,
            bos_token_id=vocab[SPECIAL_TOKENS[0]],
            eos_token_id=vocab[SPECIAL_TOKENS[1]],
            pad_token_id=vocab[SPECIAL_TOKENS[1]],
        )
    )
    te.save_pretrained(path / "text_encoder", safe_serialization=True)
    if not unet_weights:
        with torch.device("meta"):
            UNet2DConditionModel.from_config(SD15_UNET).save_config(path / "unet")
    stamp.write_text(str(version))
    return path


def training_unet(size: str, model: Path, rank: int):
    import torch
    from bench_train_step import SD15_UNET
    from diffusers import UNet2DConditionModel

    from lorapipe.models import load_parts, lora_config

    if size == "sd15":
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(SD15_UNET)
    else:
        unet = load_parts(model, ("unet",))["unet"]
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(lora_config(rank, rank, ["to_q", "to_k", "to_v", "to_out.0"]))
    return unet.train()


def image_shards(work: Path, images: int, shards: int, resolution: int) -> tuple[list, dict]:
    """Image shards (tar) at ``resolution``, square crop; returns (paths, seconds per stage)."""
    from bench_shards import make_dataset

    from lorapipe.manifest import ScanSettings, read_jsonl, scan_shard
    from lorapipe.shards import ShardSettings, write_shard

    root = work / f"data-{images}"
    rels = make_dataset(root, images)
    scan = ScanSettings(
        resolution=resolution, min_size=0.5, max_pixels=MAX_PIXELS, background=BACKGROUND
    )
    settings = ShardSettings(resolution, 64, False, MAX_PIXELS, BACKGROUND)
    out, times = [], {"scan_shard_s": [], "write_shard_s": []}
    per = -(-len(rels) // shards)
    for k in range(shards):
        part = rels[k * per : (k + 1) * per]
        d = work / f"img-{images}-{resolution}" / f"{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        manifest, captions = d / "manifest.jsonl", d / "captions.jsonl"
        t = time.perf_counter()
        scan_shard(root, part, scan, manifest)  # no scan cache: a first scan
        times["scan_shard_s"].append(time.perf_counter() - t)
        captions.write_text(
            "".join(
                json.dumps({"path": r["path"], "caption": CAPTION.format(i=i)}) + "\n"
                for i, r in enumerate(read_jsonl(manifest))
            )
        )
        t = time.perf_counter()
        write_shard(root, manifest, captions, settings, d / "shard.tar", d / "shard.jsonl")
        times["write_shard_s"].append(time.perf_counter() - t)
        out.append((d / "shard.tar", len(part)))
    return out, times


# ---------------------------------------------------------------- the measurement
def measure(size: str, args, work: Path, tiny: Path) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL  # noqa: F401  (imported before any timing)
    from transformers import CLIPTextModel  # noqa: F401

    from lorapipe.latents import encode_shard, load_latent_cache
    from lorapipe.models import load_parts, vae_scaling_factor
    from lorapipe.shards import read_samples
    from lorapipe.training.batches import draw as _draw

    resolution, batch = SIZES[size]
    batch = args.batch or batch
    t = time.perf_counter()
    model = tiny if size == "tiny" else sd15_model(work, tiny)
    model_s = time.perf_counter() - t
    shards, prep = image_shards(work, args.images, args.shards, resolution)
    print(
        f"[{size}] {len(shards)} image shards of {shards[0][1]} images at {resolution} px "
        f"(model folder ready in {model_s:.1f} s)",
        flush=True,
    )

    # latent cache: the workflow's encode stage, one shard at a time (model loaded per call)
    latent_tars, encode_s = [], []
    for tar, _ in shards:
        lt = tar.with_name(f"latents-{size}.tar")
        t = time.perf_counter()
        encode_shard(tar, model, lt, batch_size=8)
        encode_s.append(time.perf_counter() - t)
        latent_tars.append(str(lt))
    t = time.perf_counter()
    samples, _empty = load_latent_cache(latent_tars)
    load_cache_s = time.perf_counter() - t

    # on the fly: the same encoders, loaded once for the run
    parts = load_parts(model, ("vae", "text_encoder", "tokenizer", "scheduler"))
    vae, te, tok, sched = (parts[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler"))
    vae.eval()
    te.eval()
    scaling = vae_scaling_factor(vae)
    n_t = sched.config.num_train_timesteps

    unet = training_unet(size, model, args.lora_rank)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def image_stream():
        while True:
            for tar, _ in shards:
                yield from read_samples(tar)

    stream = image_stream()
    state = {"cached": 0, "epoch": 0}

    def data_cached():
        lat, noise, ts, text = [], [], [], []
        for _ in range(batch):
            s = samples[state["cached"] % len(samples)]
            state["cached"] += 1
            eps, nz, t, _drop, _g = _draw(s, 0, state["cached"], n_t, 0.0)
            lat.append((s["mean"].float() + torch.exp(0.5 * s["logvar"].float()) * eps) * scaling)
            noise.append(nz)
            ts.append(t)
            text.append(s["text"].float())
        latents, noise_t = torch.stack(lat), torch.stack(noise)
        timesteps = torch.tensor(ts, dtype=torch.long)
        return sched.add_noise(latents, noise_t, timesteps), timesteps, torch.stack(text), noise_t

    def data_on_the_fly():
        chunk = [next(stream) for _ in range(batch)]
        with torch.no_grad():
            pixels = np.stack([np.asarray(img, dtype=np.float32) for _, img, _ in chunk])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
            g = torch.Generator().manual_seed(state["epoch"])
            latents = vae.encode(x).latent_dist.sample(generator=g) * scaling
            ids = tok(
                [m["caption"] for _, _, m in chunk],
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            text = te(ids)[0]
        noise_t = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, n_t, (batch,), generator=g)
        return sched.add_noise(latents, noise_t, timesteps), timesteps, text, noise_t

    def step(get_batch) -> tuple[float, float]:
        t0 = time.perf_counter()
        noisy, timesteps, cond, target = get_batch()
        t1 = time.perf_counter()
        pred = unet(noisy, timesteps, cond, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1

    modes = {"cached latents": data_cached, "on the fly": data_on_the_fly}
    timings: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    load_before = load_average()
    for i in range(args.warmup + args.steps):
        state["epoch"] = i
        order = list(modes) if i % 2 == 0 else list(modes)[::-1]
        for m in order:
            d, c = step(modes[m])
            if i >= args.warmup:
                timings[m].append((d, c))
    rows = {}
    for m, ts in timings.items():
        data = [d for d, _ in ts]
        comp = [c for _, c in ts]
        shares = [d / (d + c) for d, c in ts]
        rows[m] = {
            "data_s": median(data),
            "compute_s": median(comp),
            "step_s": median([d + c for d, c in ts]),
            "data_share_median": median(shares),
            "data_share_total": sum(data) / (sum(data) + sum(comp)),
            "images_per_s": batch * len(ts) / (sum(data) + sum(comp)),
            "data_times_s": data,
            "compute_times_s": comp,
        }
    images_per_shard = shards[0][1]
    return {
        "size": size,
        "resolution": resolution,
        "latent": resolution // 8,
        "batch": batch,
        "images": args.images,
        "shards": len(shards),
        "images_per_shard": images_per_shard,
        "lora_rank": args.lora_rank,
        "trainable_params": sum(p.numel() for p in params),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "text_encoder_params": sum(p.numel() for p in te.parameters()),
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "load_average_before_steps": load_before,
        "load_average_after_steps": load_average(),
        "encode_shard_s": encode_s,
        "load_latent_cache_s": load_cache_s,
        **{k: v for k, v in prep.items()},
        "modes": rows,
    }


def import_times(repeats: int) -> dict:
    """Median wall seconds of a fresh interpreter doing each import (what every job pays)."""
    snippets = {
        "python -c pass": "pass",
        "import lorapipe.manifest": "import lorapipe.manifest, sys; "
        "assert 'torch' not in sys.modules, 'lorapipe.manifest imported torch'",
        "import torch, diffusers": "import torch, diffusers",
    }
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = {}
    for name, code in snippets.items():
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            ts.append(time.perf_counter() - t)
        out[name] = {"median_s": median(ts), "times_s": ts}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and steps: a smoke test")
    ap.add_argument("--sizes", default="tiny,sd15", help=f"comma-separated subset of {list(SIZES)}")
    ap.add_argument("--images", type=int, default=None, help="images in all (16; quick 8)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (8; quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    ap.add_argument("--batch", type=int, default=None, help="batch size (tiny 4, sd15 1)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--import-repeats", type=int, default=None, help="(3; quick 2)")
    args = ap.parse_args()
    args.images = args.images or (8 if args.quick else 16)
    args.steps = args.steps or (3 if args.quick else 8)
    args.import_repeats = args.import_repeats or (2 if args.quick else 3)
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; have {list(SIZES)}")

    import torch

    work = out_dir() / "datawait"
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}, load average {load_average()}", flush=True)
    tiny = tiny_model(work)
    results = [measure(s, args, work, tiny) for s in sizes]
    imports = import_times(args.import_repeats)

    rows = []
    for r in results:
        for m, x in r["modes"].items():
            rows.append(
                {
                    "size": f"{r['size']} {r['resolution']}px b{r['batch']}",
                    "batch from": m,
                    "data s": x["data_s"],
                    "compute s": x["compute_s"],
                    "step s": x["step_s"],
                    "data share": f"{100 * x['data_share_median']:.1f} %",
                    "img/s": x["images_per_s"],
                }
            )
    print(table(rows))
    for r in results:
        c, f = r["modes"]["cached latents"], r["modes"]["on the fly"]
        print(
            f"[{r['size']}] on the fly / cached step time: x{f['step_s'] / c['step_s']:.2f}; "
            f"data share {100 * c['data_share_median']:.1f} % cached vs "
            f"{100 * f['data_share_median']:.1f} % on the fly"
        )

    torch_s = imports["import torch, diffusers"]["median_s"]
    light_s = imports["import lorapipe.manifest"]["median_s"]
    startup = []
    for r in results:
        n = r["images_per_shard"]
        for stage, overhead, work_s in (
            ("encode (torch)", torch_s, median(r["encode_shard_s"])),
            ("manifest (light)", light_s, median(r["scan_shard_s"])),
        ):
            startup.append(
                {
                    "size": r["size"],
                    "stage": stage,
                    "images/shard": n,
                    "start-up s": overhead,
                    "work of 1 shard s": work_s,
                    "overhead/work": overhead / work_s,
                    "images/shard for <=10 % overhead": round(9 * overhead * n / work_s),
                }
            )
    print("\nper-job start-up (fresh interpreter, median) vs the work of one shard:")
    print(table([{"import": k, "median s": v["median_s"]} for k, v in imports.items()]))
    print(table(startup))
    write_result(
        "bench_datawait",
        {"quick": args.quick, "results": results, "import_s": imports, "startup_vs_work": startup},
    )


if __name__ == "__main__":
    main()
