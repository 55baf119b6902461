"""Digests of the LoRA tensors (not the metadata) that training writes for a set of run
configs on the tiny model: recorded before a refactor of the training stage and compared after
it (``python bench/lora_digests.py OUT.json`` with the old and the new code on PYTHONPATH).

Both the exported diffusers file and the raw LoRA state of the last checkpoint are digested: an
export-format change alters the first only. Configs cover the code paths of the loop: plain,
gradient accumulation + min-SNR + noise offset + caption dropout + LoRA dropout + cosine
schedule, text-encoder LoRA, bf16 autocast, and a resume.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "plain": {},
    "mixed": {"gradient_accumulation": 2, "min_snr_gamma": 5.0, "noise_offset": 0.05,
              "caption_dropout": 0.3, "lora_dropout": 0.1, "lr_scheduler": "cosine",
              "warmup_steps": 2},
    "text_encoder": {"train_text_encoder": True, "text_encoder_lr": 5e-5},
    "bf16": {"mixed_precision": "bf16"},
}


def tensor_digest(path: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, v in sorted(load_file(str(path)).items()):
        h.update(k.encode() + b"\0" + v.float().numpy().tobytes())
    return h.hexdigest()


def make_latents(root: Path, model: Path) -> list[str]:
    from lorapipe.captions import CaptionSettings, caption_shard
    from lorapipe.demo import make_demo_dataset
    from lorapipe.latents import encode_shard
    from lorapipe.manifest import ScanSettings, list_images, scan_shard, shard_files
    from lorapipe.shards import ShardSettings, write_shard

    images = root / "images"
    make_demo_dataset(images, images=16, seed=0)
    files = list_images(images)
    out = []
    for k in range(2):
        m, c = root / f"m{k}.jsonl", root / f"c{k}.jsonl"
        scan_shard(images, shard_files(files, 2, k), ScanSettings(64, 0.5, 10**8, "#ffffff"), m)
        caption_shard(images, m, CaptionSettings("template", "a {trigger}", "thing"),
                      root / "cc", c)
        write_shard(images, m, c, ShardSettings(64, 16, True, 10**8, "#ffffff"),
                    root / f"s{k}.tar", root / f"s{k}.jsonl")
        encode_shard(root / f"s{k}.tar", model, root / f"l{k}.tar")
        out.append(str(root / f"l{k}.tar"))
    return out


def main(out_json: str) -> None:
    import torch

    from lorapipe.config import load_config, load_yaml, resolve_run
    from lorapipe.tiny import build_tiny_model
    from lorapipe.train import train

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="lora-digests-"))
    model = build_tiny_model(root / "tiny", seed=0)
    latents = make_latents(root, model)

    def run_config(**over):
        cfg = load_yaml(REPO / "config" / "config.yaml")
        cfg["runs"]["demo"].update({"epochs": 3, "save_steps": 4, "batch_size": 2, **over})
        load_config(cfg, check_files=False)
        return resolve_run(cfg, "demo")

    result = {}
    for name, over in CONFIGS.items():
        d = root / name
        s = train(run_config(**over), latents, str(model), d / "out", d / "ck", "a" * 64)
        last = sorted((d / "ck").glob("*/step-*/lora.safetensors"))[-1]
        result[name] = {"lora": tensor_digest(d / "out" / "pytorch_lora_weights.safetensors"),
                        "checkpoint": tensor_digest(last),
                        "final_loss": s["final_loss"], "steps": s["steps"]}
    # resume: stop at step 5, continue
    d = root / "resume"
    train(run_config(), latents, str(model), d / "out", d / "ck", "a" * 64, stop_after=5)
    train(run_config(), latents, str(model), d / "out", d / "ck", "a" * 64)
    result["resume"] = {"lora": tensor_digest(d / "out" / "pytorch_lora_weights.safetensors")}
    Path(out_json).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
