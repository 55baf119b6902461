"""Sample images for fixed prompts and seeds, with the base model and with the trained LoRA.

A grid has one column per prompt: the top row is the base model, the bottom row base + LoRA,
each image drawn from a CPU generator seeded ``seed + column``. `render_samples` makes the final
grid of a run (samples.png); `render_step_grids` one grid per saved checkpoint, from the exports
training writes at each save_steps, loading the base model once for all of them;
`render_run_samples` (the workflow's sample stage) both, from one pipeline and one base row;
`render_base_row` (stage sample_base) that base row alone, as a PNG the sample stage reads: runs
that share the base model, prompts, seed, size and steps (a changed learning rate, a sweep) draw
it once.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .io import atomic_path
from .training.checkpoints import LORA_FILE, saved_exports

log = logging.getLogger(__name__)


class _Sampler:
    """One pipeline, loaded once; rows of images for the prompts, with or without a LoRA."""

    def __init__(self, model_path, prompts, steps, size, seed, original_config=None, vae=None):
        import torch

        from .models import load_pipeline

        self.prompts = list(prompts) or ["a photo"]
        self.steps, self.size, self.seed = steps, size, seed
        self.pipe = load_pipeline(model_path, original_config, vae)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe.to(device).set_progress_bar_config(disable=True)
        self._torch = torch

    def row(self) -> list:
        out = []
        for i, prompt in enumerate(self.prompts):
            g = self._torch.Generator("cpu").manual_seed(self.seed + i)
            image = self.pipe(
                prompt,
                num_inference_steps=self.steps,
                height=self.size,
                width=self.size,
                generator=g,
            )
            out.append(image.images[0])
        return out

    def base_row_of(self, png: str | os.PathLike) -> list | None:
        """The top row of a grid this sampler would draw (samples.png, or a base row PNG of
        `render_base_row`: same prompts, seeds, size and steps), cut out of its PNG; None when
        its shape fits neither."""
        from PIL import Image

        with Image.open(png) as im:
            im = im.convert("RGB")
        n, size = len(self.prompts), self.size
        if im.size not in ((size * n, size * 2), (size * n, size)):
            return None
        return [im.crop((i * size, 0, (i + 1) * size, size)) for i in range(n)]

    def base_row(self, png: str | os.PathLike | None = None) -> list:
        """The base row: cut out of ``png`` (`base_row_of`) when it fits, else drawn (with a
        warning when there was a ``png``)."""
        base = self.base_row_of(png) if png else None
        if base is None:
            if png:
                log.warning("%s does not fit %d prompts at %d px: drawing the base row", png,
                            len(self.prompts), self.size)  # fmt: skip
            base = self.row()
        return base

    def save_row(self, row: list, out_png: str | os.PathLike) -> None:
        """``row`` side by side in one PNG (what `base_row_of` cuts up again)."""
        from PIL import Image

        size = self.size
        strip = Image.new("RGB", (size * len(row), size), "white")
        for i, image in enumerate(row):
            strip.paste(image, (i * size, 0))
        with atomic_path(out_png) as tmp:
            strip.save(tmp, format="PNG")

    ADAPTER = "lorapipe"

    def load(self, lora_file: Path, swap: bool = False) -> None:
        """Load a LoRA file into the pipeline. ``swap``: it replaces the one loaded before, from
        the same run (same rank, alpha and modules): its weights are copied into the layers
        already in the model (diffusers' hotswap) instead of the old layers being removed and
        new ones injected. diffusers swaps no text-encoder LoRA: a file with one is loaded
        anew."""
        if swap and _has_text_encoder_keys(lora_file):
            self.pipe.unload_lora_weights()
            swap = False
        self.pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name,
                                    adapter_name=self.ADAPTER, hotswap=swap)  # fmt: skip

    def grid(self, base: list, tuned: list, out_png: str | os.PathLike) -> None:
        from PIL import Image

        size = self.size
        grid = Image.new("RGB", (size * len(base), size * 2), "white")
        for i, (a, b) in enumerate(zip(base, tuned, strict=True)):
            grid.paste(a, (i * size, 0))
            grid.paste(b, (i * size, size))
        with atomic_path(out_png) as tmp:
            grid.save(tmp, format="PNG")


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
    s = _Sampler(model_path, prompts, steps, size, seed, original_config)
    base = s.row()
    s.pipe.load_lora_weights(str(Path(lora_dir)))
    s.grid(base, s.row(), out_png)


def render_base_row(
    model_path: str,
    prompts: list[str],
    out_png: str | os.PathLike,
    steps: int = 20,
    size: int = 512,
    seed: int = 0,
    original_config: str | None = None,
    vae: str | None = None,
) -> None:
    """The top row of a sample grid (the base model, no LoRA) alone: one image per prompt, left
    to right, in one PNG; `render_run_samples` takes it as ``base_png``."""
    s = _Sampler(model_path, prompts, steps, size, seed, original_config, vae)
    s.save_row(s.row(), out_png)


def render_step_grids(
    model_path: str,
    exports_dir: str | os.PathLike,
    prompts: list[str],
    out_dir: str | os.PathLike,
    final_png: str | os.PathLike,
    final_step: int,
    steps: int = 20,
    size: int = 512,
    seed: int = 0,
    original_config: str | None = None,
) -> list[Path]:
    """``out_dir/step-NNNNNN.png`` for each saved step in ``exports_dir`` (a run's
    `checkpoints.Layout.exports`; the grid of
    `render_samples` with that step's LoRA), and the final grid ``final_png`` (samples.png,
    already rendered) copied in as the final step's. The base row is the top row of
    ``final_png`` (the same prompts, seeds and settings draw it): only the LoRA rows are drawn.

    Returns the PNGs written, in step order.
    """
    todo = _steps_before(exports_dir, final_step)
    written = []
    if todo:
        s = _Sampler(model_path, prompts, steps, size, seed, original_config)
        written = _step_rows(s, s.base_row(final_png), todo, out_dir)
    else:
        log.info("no saved steps in %s: only the final grid", exports_dir)
    return [*written, _final_step_grid(final_png, out_dir, final_step)]


def render_run_samples(
    model_path: str,
    lora_dir: str | os.PathLike,
    exports_dir: str | os.PathLike,
    prompts: list[str],
    out_png: str | os.PathLike,
    out_dir: str | os.PathLike,
    final_step: int,
    steps: int = 20,
    size: int = 512,
    seed: int = 0,
    original_config: str | None = None,
    vae: str | None = None,
    base_png: str | os.PathLike | None = None,
) -> list[Path]:
    """A run's sample grids from one pipeline: ``out_png`` (`render_samples` with the final
    LoRA in ``lora_dir``) and ``out_dir/step-NNNNNN.png`` (`render_step_grids`), with the base
    row drawn once for all of them. The same bytes as those two, one after the other.
    ``vae``: the base model's VAE override folder (decodes the images), if it has one.
    ``base_png``: the base row as `render_base_row` drew it with these settings (then only the
    LoRA rows are drawn here); one of another shape is drawn again, with a warning.

    Returns the step PNGs written, in step order (the final one last).
    """
    s = _Sampler(model_path, prompts, steps, size, seed, original_config, vae)
    base = s.base_row(base_png)
    s.load(Path(lora_dir) / LORA_FILE)
    s.grid(base, s.row(), out_png)
    written = _step_rows(s, base, _steps_before(exports_dir, final_step), out_dir, loaded=True)
    return [*written, _final_step_grid(out_png, out_dir, final_step)]


def _has_text_encoder_keys(lora_file: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as f:
        return any(k.startswith("text_encoder") for k in f.keys())


def _steps_before(exports_dir: str | os.PathLike, final_step: int) -> dict[int, Path]:
    """The saved exports of the steps before the final one, by step."""
    return {k: v for k, v in saved_exports(exports_dir).items() if k < final_step}


def _step_rows(s: _Sampler, base: list, todo: dict[int, Path], out_dir, loaded=False) -> list:
    """The grid of each step in ``todo``: ``base`` on top, that step's LoRA below. ``loaded``:
    the pipeline holds a LoRA of this run already (`_Sampler.load` swaps the next one in)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for step, folder in todo.items():
        s.load(folder / LORA_FILE, swap=loaded)
        loaded = True
        png = out_dir / f"step-{step:06d}.png"
        s.grid(base, s.row(), png)
        written.append(png)
        log.info("step %d: %s", step, png)
    return written


def _final_step_grid(final_png, out_dir, final_step: int) -> Path:
    """The final grid copied in as the final step's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step-{final_step:06d}.png"
    with atomic_path(final) as tmp:
        shutil.copyfile(final_png, tmp)
    return final
