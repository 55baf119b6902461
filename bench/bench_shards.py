"""Shard stage throughput: manifest scan (first vs cached rescan), write_shard, read_samples.

A seeded dataset of ``--images`` pictures around 512 px (lorapipe.demo's renderer plus +-2 noise,
which compresses about like a photo: PNG ~57 %, JPEG ~26 % of the raw size; half JPEG q90, half PNG,
five sizes/aspects) is generated once into bench/out/shards/data-N. Then, each
``--repeats`` times (median reported):

- ``lorapipe.manifest.scan_shard`` with no cache (sha256 + full decode of every file), then again
  with the cache it wrote (stat only): the rescan speedup;
- ``lorapipe.shards.write_shard`` at resolution 512, bucket_step 64 (decode, bucket, LANCZOS
  resize/crop, PNG encode, tar);
- ``lorapipe.shards.read_samples`` over the tar it wrote (WebDataset + PNG decode);

plus a per-image breakdown of write_shard's parts on a subset, to show where its time goes.

    python bench/bench_shards.py [--images 500] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from inspect import signature
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, median, out_dir, table, write_result  # noqa: E402

sys.path.insert(0, str(REPO / "src"))

SIZES = ((512, 512), (640, 480), (480, 640), (768, 512), (600, 600))
RESOLUTION, BUCKET_STEP = 512, 64
MAX_PIXELS, BACKGROUND = 178956970, "#ffffff"
GENERATOR = 3  # bump when make_dataset changes, so the cached dataset is rebuilt


def make_dataset(root: Path, images: int, seed: int = 0) -> list[str]:
    """Write (once) ``images`` seeded pictures; returns their relative paths."""
    import numpy as np
    from PIL import Image

    from lorapipe.demo import _render

    stamp = root / ".complete"
    want = f"{images}:{seed}:{GENERATOR}"
    rels = [f"img_{i:05d}.{'jpg' if i % 2 == 0 else 'png'}" for i in range(images)]
    if stamp.exists() and stamp.read_text() == want:
        return rels
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        old.unlink()
    rng = np.random.default_rng(seed)
    for i, rel in enumerate(rels):
        w, h = SIZES[i % len(SIZES)]
        arr = _render(rng, w, h).astype(np.int16) + rng.integers(-2, 3, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if rel.endswith(".jpg"):
            img.save(root / rel, format="JPEG", quality=90)
        else:
            img.save(root / rel, format="PNG", compress_level=1)
    stamp.write_text(want)
    return rels


def breakdown(root: Path, rels: list[str]) -> dict[str, float]:
    """Median ms per image of write_shard's parts, run in isolation."""
    from lorapipe.images import load_rgb, make_buckets, nearest_bucket, parse_colour, resize_crop

    buckets = make_buckets(RESOLUTION, BUCKET_STEP)
    bg = parse_colour(BACKGROUND)
    parts: dict[str, list[float]] = {
        k: [] for k in ("read", "sha256", "decode", "resize_crop", "png_encode", "png_sha256")
    }
    for rel in rels:
        t0 = time.perf_counter()
        data = (root / rel).read_bytes()
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        img = load_rgb(data, max_pixels=MAX_PIXELS, background=bg)
        t3 = time.perf_counter()
        img, _ = resize_crop(img, nearest_bucket(*img.size, buckets))
        t4 = time.perf_counter()
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        t5 = time.perf_counter()
        hashlib.sha256(buf.getvalue()).hexdigest()
        t6 = time.perf_counter()
        for k, a, b in zip(parts, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6), strict=True):
            parts[k].append((b - a) * 1e3)
    return {k: median(v) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--breakdown", type=int, default=100, help="images in the per-part breakdown")
    args = ap.parse_args()

    from lorapipe.images import pil_identity
    from lorapipe.manifest import ScanSettings, read_jsonl, scan_shard
    from lorapipe.shards import ShardSettings, read_samples, write_shard

    # as the workflow's scripts call them (checksum sidecars), where this lorapipe has the option
    scan_kw = {"checksum": True} if "checksum" in signature(scan_shard).parameters else {}
    write_kw = {"checksum": True} if "checksum" in signature(write_shard).parameters else {}
    work = out_dir() / "shards"
    root = work / f"data-{args.images}"  # one cached dataset per size
    t0 = time.perf_counter()
    rels = make_dataset(root, args.images)
    gen_s = time.perf_counter() - t0
    mb = sum((root / r).stat().st_size for r in rels) / 1e6
    print(
        f"dataset: {len(rels)} images, {mb:.1f} MB ({'generated' if gen_s > 1 else 'cached'} "
        f"in {gen_s:.1f} s); PIL: {pil_identity()}"
    )

    scan = ScanSettings(
        resolution=RESOLUTION, min_size=0.5, max_pixels=MAX_PIXELS, background=BACKGROUND
    )
    manifest, cache = work / "manifest.jsonl", work / "scan_cache.jsonl"
    captions = work / "captions.jsonl"
    tar, index = work / "shard.tar", work / "shard.jsonl"
    times: dict[str, list[float]] = {"scan_first": [], "scan_cached": [], "write": [], "read": []}
    counts = {}
    for _ in range(args.repeats):
        cache.unlink(missing_ok=True)
        t = time.perf_counter()
        counts["first"] = scan_shard(root, rels, scan, manifest, cache, **scan_kw)
        times["scan_first"].append(time.perf_counter() - t)
        t = time.perf_counter()
        counts["cached"] = scan_shard(root, rels, scan, manifest, cache, **scan_kw)
        times["scan_cached"].append(time.perf_counter() - t)

        captions.write_text(  # rewritten each time: it must match this dataset
            "".join(
                json.dumps({"path": r["path"], "caption": f"a picture number {i}"}) + "\n"
                for i, r in enumerate(read_jsonl(manifest))
            )
        )
        settings = ShardSettings(RESOLUTION, BUCKET_STEP, True, MAX_PIXELS, BACKGROUND)
        t = time.perf_counter()
        written = write_shard(root, manifest, captions, settings, tar, index, **write_kw)
        times["write"].append(time.perf_counter() - t)

        t = time.perf_counter()
        n_read, buckets = 0, {}
        for _key, img, meta in read_samples(tar):
            n_read += 1
            size = tuple(meta["size"])
            assert img.size == size, (img.size, size)
            buckets[f"{size[0]}x{size[1]}"] = buckets.get(f"{size[0]}x{size[1]}", 0) + 1
        times["read"].append(time.perf_counter() - t)
    assert counts["cached"]["cached"] == len(rels), counts
    assert written == n_read == counts["first"]["ok"], (written, n_read, counts)

    parts = breakdown(root, rels[: args.breakdown])
    med = {k: median(v) for k, v in times.items()}
    rows = [
        {
            "stage": "scan_shard (no cache)",
            "median s": med["scan_first"],
            "images/s": len(rels) / med["scan_first"],
        },
        {
            "stage": "scan_shard (cached rescan)",
            "median s": med["scan_cached"],
            "images/s": len(rels) / med["scan_cached"],
        },
        {"stage": "write_shard", "median s": med["write"], "images/s": written / med["write"]},
        {"stage": "read_samples", "median s": med["read"], "images/s": n_read / med["read"]},
    ]
    speedup = med["scan_first"] / med["scan_cached"]
    print(table(rows))
    print(
        f"cached rescan speedup: x{speedup:.0f}; tar {tar.stat().st_size / 1e6:.1f} MB; "
        f"buckets {buckets}"
    )
    print(f"\nwrite_shard per-image breakdown (median ms over {min(args.breakdown, len(rels))}):")
    print(table([{"part": k, "ms": v} for k, v in parts.items()]))
    write_result(
        "bench_shards",
        {
            "pil": pil_identity(),
            "images": len(rels),
            "dataset_mb": mb,
            "resolution": RESOLUTION,
            "bucket_step": BUCKET_STEP,
            "repeats": args.repeats,
            "checksum_sidecars": bool(write_kw),
            "median_s": med,
            "images_per_s": {r["stage"]: r["images/s"] for r in rows},
            "scan_rescan_speedup": speedup,
            "scan_counts": counts,
            "tar_mb": tar.stat().st_size / 1e6,
            "buckets": buckets,
            "write_breakdown_ms_per_image": parts,
            "all_times_s": times,
        },
    )


if __name__ == "__main__":
    main()
