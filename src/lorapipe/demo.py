"""A synthetic dataset with a visible, learnable style, generated from a seed.

Every image shows concentric rings and diagonal stripes in one fixed palette (orange, teal, cream
on near-black) — "lorapipe style" — at several sizes and aspect ratios, so buckets get exercised.
Every third image has a sidecar .txt caption; the rest get the configured captioner's caption.
One deliberately truncated JPEG shows how a broken file is rejected without stopping the run.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

# numpy is imported by what draws, not at import: every Snakemake plan imports this module for
# demo_files (65 ms, #17).
PALETTE = ((16, 18, 24), (240, 140, 40), (30, 170, 160), (245, 235, 210))
SIZES = ((96, 96), (128, 80), (80, 128), (112, 96), (72, 72))
BROKEN = "broken/truncated.jpg"


def demo_files(images: int) -> list[str]:
    """Relative paths the generator writes (images, sidecars, the broken file); writes nothing."""
    out = []
    for i in range(images):
        out.append(f"img_{i:03d}.png")
        if i % 3 == 0:
            out.append(f"img_{i:03d}.txt")
    out.append(BROKEN)
    return out


def _render(rng, width: int, height: int):
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    ring = (np.hypot(xx - cx, yy - cy) / rng.uniform(6, 12)).astype(int) % 3
    stripes = ((xx + yy) / rng.uniform(5, 9)).astype(int) % 2
    idx = np.where(stripes == 0, ring + 1, 0)
    idx = np.where(ring == 2, 3, idx)
    return np.array(PALETTE, np.uint8)[idx]


def make_demo_dataset(root: str | os.PathLike, images: int = 40, seed: int = 0) -> list[str]:
    """Write the synthetic dataset into ``root`` (deterministic bytes for a given seed).

    Returns:
        The relative paths written (same as ``demo_files(images)``).
    """
    import numpy as np
    from PIL import Image

    from .io import atomic_write_bytes, atomic_write_text

    root = Path(root)
    rng = np.random.default_rng(seed)
    subjects = ("rings", "stripes", "a sunset", "a target", "waves")
    for i in range(images):
        w, h = SIZES[i % len(SIZES)]
        buf = io.BytesIO()
        Image.fromarray(_render(rng, w, h)).save(buf, format="PNG", compress_level=6)
        atomic_write_bytes(root / f"img_{i:03d}.png", buf.getvalue())
        if i % 3 == 0:
            text = f"a picture in lorapipe style, {subjects[i % len(subjects)]}"
            atomic_write_text(root / f"img_{i:03d}.txt", text + "\n")
    buf = io.BytesIO()
    Image.fromarray(_render(rng, 96, 96)).save(buf, format="JPEG", quality=90)
    atomic_write_bytes(root / BROKEN, buf.getvalue()[: len(buf.getvalue()) // 2])
    return demo_files(images)
