"""Sample images for fixed prompts and seeds, with the base model and with the trained LoRA."""

from __future__ import annotations

import os
from pathlib import Path

from .io import atomic_path


def render_samples(
    model_path: str,
    lora_dir: str | os.PathLike,
    prompts: list[str],
    out_png: str | os.PathLike,
    steps: int = 20,
    size: int = 512,
    seed: int = 0,
    original_config: str | None = None,
) -> None:
    """A grid PNG: one column per prompt, top row base model, bottom row base + LoRA.

    ``original_config``: for a single-file checkpoint, the local diffusers folder describing it.
    """
    import torch
    from PIL import Image

    from .models import load_pipeline

    prompts = prompts or ["a photo"]
    pipe = load_pipeline(model_path, original_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device).set_progress_bar_config(disable=True)

    def row():
        out = []
        for i, prompt in enumerate(prompts):
            g = torch.Generator("cpu").manual_seed(seed + i)
            image = pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=g)
            out.append(image.images[0])
        return out

    base = row()
    pipe.load_lora_weights(str(Path(lora_dir)))
    tuned = row()
    grid = Image.new("RGB", (size * len(prompts), size * 2), "white")
    for i, (a, b) in enumerate(zip(base, tuned, strict=True)):
        grid.paste(a, (i * size, 0))
        grid.paste(b, (i * size, size))
    with atomic_path(out_png) as tmp:
        grid.save(tmp, format="PNG")
