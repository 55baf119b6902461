"""Latent cache size before and after storing text-encoder outputs once per distinct caption (#13).

Two datasets made by `lorapipe.demo.make_demo_dataset` (template captions; every third image has
a sidecar caption of its own, one of five): ``demo`` (40 images, seed 0: the shipped demo) and
``1k`` (1000 images, seed 1). Both go through the real stage functions with config/config.yaml's
``demo`` dataset settings (64 px, bucket_step 16, 4 shards, template captioner ``a picture in
{trigger} style``, trigger ``lorapipe``): `manifest.scan_shard`, `captions.caption_shard`,
`shards.write_shard`, then `latents.encode_shard` with the tiny-sd model (lorapipe.tiny, seed 0),
float32, twice on the same image shards:

* **after**: this checkout's encoder (one ``__text__`` member per distinct caption of a shard);
* **before**: the encoder of commit 7cf4ced (each sample carrying its own ``text`` tensor), from a
  ``git archive`` of its ``src/`` in a temporary folder, run in a subprocess.

A third figure, **before (computed)**, is this checkout's cache with each text member counted once
per sample that references it (`_synthetic.per_sample_text_bytes`): a check on the archive run.
The tiny model's text output is 77x32 fp32 (9.9 KB); SD-1.5's is 77x768 (237 KB) against 131 KB of
latents at 512 px, so the same counts are also projected to SD-1.5 shapes from the safetensors
sizes of those tensors (tar headers and padding included).

    python bench/bench_cache_size.py [--sets demo,1k] [--commit 7cf4ced]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _synthetic  # noqa: E402
from _common import REPO, out_dir, table, write_result  # noqa: E402

SETS = {"demo": (40, 0), "1k": (1000, 1)}  # name: (images, seed)
OLD_ENCODE = """
import sys
from lorapipe.latents import encode_shard
for tar, out in zip(sys.argv[2::2], sys.argv[3::2]):
    encode_shard(tar, sys.argv[1], out)
"""


def dataset_settings() -> dict:
    """config/config.yaml's demo dataset, schema defaults filled in."""
    from lorapipe.config import load_config, load_yaml

    cfg = load_yaml(REPO / "config" / "config.yaml")
    load_config(cfg, check_files=False)
    return cfg["datasets"]["demo"]


def image_shards(root: Path, work: Path, ds: dict) -> list[Path]:
    """The dataset's image shards, made by the stage functions as the workflow calls them."""
    from lorapipe.captions import CaptionSettings, caption_shard
    from lorapipe.manifest import ScanSettings, list_images, scan_shard, shard_files
    from lorapipe.shards import ShardSettings, write_shard

    files = list_images(root)
    scan = ScanSettings(ds["resolution"], ds["min_size"], ds["max_pixels"], ds["background"])
    caps = CaptionSettings(ds["captioner"], ds["caption_template"], ds["trigger"],
                           ds["caption_prefix"])  # fmt: skip
    shard = ShardSettings(ds["resolution"], ds["bucket_step"], ds["buckets"], ds["max_pixels"],
                          ds["background"])  # fmt: skip
    out = []
    for k in range(ds["shards"]):
        m, c, t = work / f"m{k}.jsonl", work / f"c{k}.jsonl", work / f"s{k}.tar"
        scan_shard(root, shard_files(files, ds["shards"], k), scan, m)
        caption_shard(root, m, caps, work / "caption-cache", c)
        write_shard(root, m, c, shard, t, work / f"s{k}.jsonl")
        out.append(t)
    return out


def encode_old(commit: str, tars: list[Path], model: Path, outs: list[Path]) -> None:
    """``encode_shard`` of ``commit`` (its src/ from git archive) on ``tars``."""
    with tempfile.TemporaryDirectory(prefix=f"lorapipe-{commit}-") as d:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"],
                                 check=True, capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", d], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": str(Path(d) / "src")}
        args = [str(model)] + [str(x) for pair in zip(tars, outs, strict=True) for x in pair]
        subprocess.run([sys.executable, "-c", OLD_ENCODE, *args], check=True, env=env, cwd=d)


def text_members_per_sample(paths: list[Path]) -> dict:
    """Counts in old-layout shards: samples with a ``text`` tensor in their latents member."""
    import struct

    n = with_text = 0
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf:
                if m.name.endswith(".latents.safetensors"):
                    data = tf.extractfile(m).read()
                    (size,) = struct.unpack("<Q", data[:8])
                    n += 1
                    with_text += "text" in json.loads(data[8 : 8 + size])
    return {"samples": n, "samples_with_text": with_text}


def member_bytes(data_bytes: int) -> int:
    """Bytes a tar member of ``data_bytes`` takes (512-byte header, data padded to 512)."""
    return 512 + -(-data_bytes // 512) * 512


def sd15_projection(samples: int, texts: int) -> dict:
    """The same samples and distinct-caption counts at SD-1.5 shapes (512 px, fp32)."""
    import torch

    z, z2, t = torch.zeros(4, 64, 64), torch.zeros(4, 64, 64), torch.zeros(77, 768)
    lat = member_bytes(len(_synthetic._blob({"mean": z, "logvar": z2})))
    lat_text = member_bytes(len(_synthetic._blob({"mean": z, "logvar": z2, "text": t})))
    text = member_bytes(len(_synthetic._blob({"text": t})))
    meta = member_bytes(400)
    before = samples * (lat_text + meta)
    after = samples * (lat + meta) + texts * text
    return {"sd15_before_bytes": before, "sd15_after_bytes": after,
            "sd15_after_vs_before": after / before}  # fmt: skip


def measure(name: str, args, ds: dict, model: Path, work: Path) -> dict:
    """Both encodings of one dataset; sizes."""
    from lorapipe.demo import make_demo_dataset
    from lorapipe.latents import encode_shard

    images, seed = SETS[name]
    root = work / f"{name}-images"
    make_demo_dataset(root, images=images, seed=seed)
    (work / name).mkdir()
    tars = image_shards(root, work / name, ds)
    new = [t.with_name(f"new-{t.stem}.tar") for t in tars]
    old = [t.with_name(f"old-{t.stem}.tar") for t in tars]
    for t, o in zip(tars, new, strict=True):
        encode_shard(t, model, o)
    encode_old(args.commit, tars, model, old)
    after = _synthetic.per_sample_text_bytes([str(p) for p in new])
    before = sum(p.stat().st_size for p in old)
    text_size = after["text_member_bytes"] / max(1, after["text_members"])  # one shape
    computed = (after["tar_bytes"] - after["text_members"] * member_bytes(int(text_size))
                + after["text_bytes_if_per_sample"])  # fmt: skip
    captions = {json.loads(x)["caption"] for k in range(ds["shards"])
                for x in (work / name / f"c{k}.jsonl").read_text().splitlines()}  # fmt: skip
    res = {"set": name, "images": images, "shards": len(tars), "distinct_captions": len(captions),
           **after, "before_bytes": before, **{f"before_{k}": v for k, v in
                                               text_members_per_sample(old).items()},
           "before_computed_bytes": computed, "after_vs_before": after["tar_bytes"] / before,
           **sd15_projection(after["samples"], after["text_members"])}  # fmt: skip
    return res


def main() -> None:
    """Both datasets encoded both ways; the table and JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="demo,1k", help=f"comma-separated subset of {list(SETS)}")
    ap.add_argument("--commit", default="7cf4ced", help="the encoder before #13")
    args = ap.parse_args()
    from lorapipe.tiny import build_tiny_model

    os.environ.setdefault("LORAPIPE_CACHE", tempfile.mkdtemp(prefix="lorapipe-cache-"))
    ds = dataset_settings()
    work = Path(tempfile.mkdtemp(prefix="cache-size-", dir=out_dir()))
    try:
        model = build_tiny_model(work / "tiny-sd", seed=0)
        results = [measure(n, args, ds, model, work) for n in args.sets.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kb = 1024
    print(table([{
        "set": r["set"], "samples": r["samples"], "text members": r["text_members"],
        "before KiB (7cf4ced)": r["before_bytes"] / kb,
        "before KiB (computed)": r["before_computed_bytes"] / kb,
        "after KiB": r["tar_bytes"] / kb, "after/before": r["after_vs_before"],
        "SD-1.5 before MiB": r["sd15_before_bytes"] / kb**2,
        "SD-1.5 after MiB": r["sd15_after_bytes"] / kb**2,
        "SD-1.5 after/before": r["sd15_after_vs_before"],
    } for r in results]))  # fmt: skip
    write_result("bench_cache_size", {"commit_before": args.commit, "dataset": ds,
                                      "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
