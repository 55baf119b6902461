"""Synthetic latent shards in the latent stage's layout, small model folders, and a ``train()``
child process: what bench_train_memory, bench_streaming and gpu_check share.

A latent shard here has the members `lorapipe.latents` writes, in its order (the reader,
`lorapipe.latent_cache.LatentCache`, needs nothing else):

* ``__empty__.empty.safetensors``: the empty prompt's outputs (``text``, SDXL also ``pooled``);
* ``__text__<ref>.text.safetensors`` per distinct caption (``ref`` = `latent_cache.text_ref`);
* per sample ``<key>.latents.safetensors`` (``mean``, ``logvar``) and ``<key>.json`` (``path``,
  ``caption``, ``size``, ``original_size``, ``crop``, ``text_ref``, ``dtype``);

written with the standard library's tarfile (member attributes as webdataset's TarWriter sets them
for the encode stage: mtime 0, owner lorapipe), safetensors headers in `io.canonical_safetensors`
order, and a ``.sha256`` sidecar (`io.write_checksum`) as the workflow writes it. The tensors are
seeded random numbers; ``logvar`` is around -6 as a VAE's is.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "src"))

# SD-1.5's latent and text shapes (4x64x64 latents at 512 px, CLIP-L 77x768 cross-attention) at
# toy widths, so a LoRA step runs on a CPU: cross-attention on the 16x16 level only (on the 64x64
# level, as in SD-1.5, a step at batch 4 took ~30 s on this 2-core machine; here ~2 s under load).
SD15_SMALL_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
}


@dataclass(frozen=True)
class Shape:
    """Per-sample tensor shapes of a latent cache."""

    latent: tuple[int, int, int]  # (C, H, W)
    text: tuple[int, int]  # (L, D): the UNet's encoder hidden states
    pooled: int | None = None  # SDXL: the second encoder's pooled output width

    @property
    def pixels(self) -> int:
        """The image side the latents stand for (VAE downsampling x8)."""
        return self.latent[1] * 8


SHAPES = {
    "tiny": Shape((4, 8, 8), (77, 32)),  # lorapipe.tiny at the demo's 64 px
    "sd15": Shape((4, 64, 64), (77, 768)),  # SD-1.5 at 512 px
    "sdxl": Shape((4, 128, 128), (77, 2048), 1280),  # SDXL at 1024 px
}


def caption_of(i: int, captions: int) -> str:
    """The caption of sample ``i`` when the set has ``captions`` distinct ones (template-like)."""
    return f"a picture in lorapipe style, variant {i % captions}"


# ---------------------------------------------------------------- writing shards
def _blob(tensors: dict) -> bytes:
    from safetensors.torch import save

    from lorapipe.io import canonical_safetensors

    return canonical_safetensors(save({k: v.contiguous() for k, v in tensors.items()}))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "lorapipe"
    tf.addfile(info, io.BytesIO(data))


def _text_tensors(shape: Shape, g, dtype) -> dict:
    import torch

    t = {"text": torch.randn(shape.text, generator=g).to(dtype)}
    if shape.pooled:
        t["pooled"] = torch.randn((shape.pooled,), generator=g).to(dtype)
    return t


def write_shard(path: Path, keys: Iterable[int], shape: Shape, captions: int, seed: int,
                dtype: str = "float32") -> None:  # fmt: skip
    """One latent shard of samples ``keys`` (ints) with a checksum sidecar, written atomically.

    Tensors are a function of (``seed``, sample key) and (``seed``, caption): a caption's (and the
    empty prompt's) outputs are the same in every shard, as one text encoder gives them."""
    import torch

    from lorapipe.io import write_checksum
    from lorapipe.latent_cache import EMPTY_KEY, text_ref

    td = getattr(torch, dtype)
    keys = list(keys)
    texts = {caption_of(i, captions) for i in keys}
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w") as tf:
        g = torch.Generator().manual_seed(seed)  # one encoder: the same "" in every shard
        _add(tf, f"{EMPTY_KEY}.empty.safetensors", _blob(_text_tensors(shape, g, td)))
        for ref, _cap in sorted((text_ref(c), c) for c in texts):
            g = torch.Generator().manual_seed(int(ref[-12:], 16) ^ seed)
            _add(tf, f"{ref}.text.safetensors", _blob(_text_tensors(shape, g, td)))
        c, h, w = shape.latent
        for i in keys:
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            mean = torch.randn(shape.latent, generator=g)
            logvar = torch.randn(shape.latent, generator=g) * 0.1 - 6.0
            _add(tf, f"s{i:07d}.latents.safetensors", _blob({"mean": mean.to(td),
                                                               "logvar": logvar.to(td)}))
            cap = caption_of(i, captions)
            px = [w * 8, h * 8]
            meta = {"path": f"img/{i:07d}.png", "caption": cap, "size": px,
                    "original_size": px, "crop": [0, 0], "text_ref": text_ref(cap),
                    "dtype": dtype}  # fmt: skip
            _add(tf, f"s{i:07d}.json", json.dumps(meta, sort_keys=True).encode())
    os.replace(tmp, path)
    write_checksum(path)


def synthetic_shards(out: Path, samples: int, shape: Shape, per_shard: int = 1000,
                     captions: int = 8, seed: int = 0, dtype: str = "float32") -> list[str]:
    """Latent shards of ``samples`` samples in ``out`` (made once: a stamp records the settings)."""
    out = Path(out)
    spec = {"samples": samples, "shape": asdict(shape), "per_shard": per_shard,
            "captions": captions, "seed": seed, "dtype": dtype, "version": 1}  # fmt: skip
    n = -(-samples // per_shard)
    paths = [out / f"latents-{k:04d}.tar" for k in range(n)]
    stamp = out / "stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec and all(p.exists() for p in paths):
        return [str(p) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for k, p in enumerate(paths):
        write_shard(p, range(k * per_shard, min(samples, (k + 1) * per_shard)), shape, captions,
                    seed, dtype)  # fmt: skip
    stamp.write_text(json.dumps(spec))
    return [str(p) for p in paths]


def per_sample_text_bytes(paths: list[str]) -> dict:
    """Sizes in a set of latent shards: tar bytes, text members, and what the text members
    would have taken had every sample carried its own (the layout before #13)."""
    out = {"tar_bytes": 0, "samples": 0, "text_members": 0, "text_member_bytes": 0,
           "text_bytes_if_per_sample": 0}  # fmt: skip
    for p in paths:
        with tarfile.open(p) as tf:
            members = {m.name: m.size for m in tf if m.isfile()}
            metas = [json.loads(tf.extractfile(n).read()) for n in members if n.endswith(".json")]
        out["tar_bytes"] += os.path.getsize(p)
        text = {n: s for n, s in members.items() if n.endswith(".text.safetensors")}
        out["samples"] += len(metas)
        out["text_members"] += len(text)
        out["text_member_bytes"] += sum(text.values())
        for m in metas:
            refs = [m["text_ref"], *(m.get("text_variant_refs") or [])]
            out["text_bytes_if_per_sample"] += sum(text[f"{r}.text.safetensors"] for r in refs)
    return out


# ---------------------------------------------------------------- model folders
def model_folder(work: Path, kind: str) -> Path:
    """A diffusers folder for ``train()``: ``tiny`` (lorapipe.tiny) or ``sd15-small`` (the tiny
    model with its UNet replaced by `SD15_SMALL_UNET`, seed 0). Training loads no text encoder
    (the shards hold the empty prompt's outputs)."""
    import shutil

    path = Path(work) / f"model-{kind}"
    stamp, version = path / ".bench-complete", json.dumps(SD15_SMALL_UNET)
    if stamp.exists() and stamp.read_text() == version:
        return path
    shutil.rmtree(path, ignore_errors=True)
    from lorapipe.tiny import build_tiny_model

    build_tiny_model(path, seed=0)
    if kind == "sd15-small":
        import torch
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        shutil.rmtree(path / "unet")
        UNet2DConditionModel(**SD15_SMALL_UNET).save_pretrained(path / "unet")
    elif kind != "tiny":
        raise ValueError(f"unknown model folder kind {kind!r}")
    stamp.write_text(version)
    return path


# ---------------------------------------------------------------- the train() child
def proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_config(settings: dict, model: str, data: str):
    """A `RunConfig` through the real config code (schema defaults, checks), files unchecked."""
    from lorapipe.config import load_config, resolve_run

    cfg = {
        "datasets": {"bench": {"path": data, "resolution": 64}},
        "base_models": {"bench": {"path": model}},
        "runs": {"bench": {"dataset": "bench", "base_model": "bench", **settings}},
    }
    load_config(cfg, check_files=False)
    return resolve_run(cfg, "bench")


def train_child(spec: dict) -> dict:
    """Run the real ``lorapipe.train.train`` once; its summary, metrics and peak RSS."""
    import diffusers  # noqa: F401  (imported before the baseline RSS: train() imports them)
    import peft  # noqa: F401
    import torch
    from diffusers import UNet2DConditionModel  # noqa: F401

    from lorapipe.train import train

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    out = Path(spec["out"])
    run = run_config(spec["run"], spec["model"], str(out))
    rss_before = proc_status("VmRSS")
    t = time.perf_counter()
    s = train(run, spec["shards"], spec["model"], out / "run", out / "ckpt", "b" * 64)
    wall = time.perf_counter() - t
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = metrics[1:] or metrics
    return {
        "peak_rss_bytes": proc_status("VmHWM"),
        "rss_before_train_bytes": rss_before,
        "train_wall_s": wall,
        "steps": s["steps"],
        "samples": s["samples"],
        "images_per_s_steady": s["images_per_s_steady"],
        "data_wait_mean": sum(m["data_wait"] for m in steady) / len(steady),
        "data_wait_per_step": [m["data_wait"] for m in metrics],
        "images_per_s_per_step": [m["images_per_s"] for m in metrics],
        "final_loss": s["final_loss"],
        "threads": torch.get_num_threads(),
    }


def run_train_child(spec: dict, timeout: float = 1800) -> dict:
    """`train_child` in a fresh interpreter (its peak RSS is its own); errors come back as
    ``{"error": ...}`` with the end of stderr."""
    import shutil

    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out / "spec.json")]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s limit"}
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}", "stderr_tail": p.stderr[-3000:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    return res


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(train_child(json.loads(Path(sys.argv[2]).read_text()))))
