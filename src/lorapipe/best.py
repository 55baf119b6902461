"""``results/runs/<run>/best/``: the files of a run's best step (lowest validation loss), where
a loader finds them without looking up the step.

The best step is the one `training.validation` found (``best_step`` in train_summary.json). Its
files are the step's export from the checkpoint folder (``<run>-stepNNNNNN.safetensors`` and
``pytorch_lora_weights.safetensors``), or the run's final files when the last step is the best.
They are hard links where the file system allows (no extra space), else copies; ``best.json``
says which step they are and its validation loss next to the last step's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .io import atomic_write_text
from .training.checkpoints import LORA_FILE


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def best_files(summary: dict, run: str, final_lora: str, final_kohya: str) -> list[Path]:
    """The files of the best step: its export's two files, or the final two."""
    step, export = summary.get("best_step"), summary.get("best_export")
    if step is None or step == summary.get("steps") or not export:
        return [Path(final_lora), Path(final_kohya)]
    folder = Path(export)
    files = [folder / LORA_FILE, folder / f"{run}-step{int(step):06d}.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"run {run}: the export of best step {step} is missing ({', '.join(missing)}); "
            "checkpoint exports live in results/checkpoints/ (rerun the run to rebuild them)"
        )
    return files


def write_best(summary_json: str, run: str, final_lora: str, final_kohya: str,
               out_dir: str | os.PathLike) -> dict:  # fmt: skip
    """Make ``out_dir`` (complete or absent: built beside it, then renamed); returns best.json."""
    summary = json.loads(Path(summary_json).read_text())
    files = best_files(summary, run, final_lora, final_kohya)
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        _link_or_copy(f, tmp / f.name)
    info = {
        "run": run,
        "step": summary.get("best_step") or summary.get("steps"),
        "val_loss": summary.get("best_val_loss"),
        "last_step": summary.get("steps"),
        "last_val_loss": summary.get("val_loss"),
        "best_is_last": summary.get("best_step") in (None, summary.get("steps")),
        "from": str(files[0].parent),
        "files": [f.name for f in files],
    }
    if summary.get("best_step") is None:
        info["note"] = "no validation loss was measured: these are the final files"
    atomic_write_text(tmp / "best.json", json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return info
