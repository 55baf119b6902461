"""The one owner of the checkpoint folder of a run, and of saving and restoring training state.

Layout (``root`` is ``results/checkpoints/<run>``)::

    root/<fingerprint[:16]>[-x<N>]/          one folder per run identity; -xN: N processes
        step-000040/                         a checkpoint (resume): complete when listed
            lora.safetensors                 the UNet's LoRA (peft keys, fp32)
            lora_te.safetensors              the text encoder's LoRA, when trained
            optimizer.pt                     optimizer state (tensors only: weights_only load)
            metrics.jsonl                    every step's metrics up to here
            state.json                       step, fingerprint, LR schedule, grad scaler
        exports/step-000040/                 both export layouts of that step (kept: a few MB)

A run trained by N processes takes other steps than the same run on one, so it gets its own
folder. Everything is written under a hidden temporary name and renamed into place, so a folder
named ``step-NNNNNN`` is complete. The last `KEEP` checkpoints are kept; every export is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..io import save_safetensors

KEEP = 2
STEP_DIR = re.compile(r"^step-(\d{6})$")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the diffusers-layout file of an export


class Layout:
    """Where the checkpoints and step exports of one run identity live."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, processes: int = 1):
        name = fingerprint[:16] + (f"-x{processes}" if processes > 1 else "")
        self.dir = Path(root) / name

    @classmethod
    def of_summary(cls, root: str | os.PathLike, fingerprint: str, summary: dict) -> Layout:
        """The layout a finished run used (``train_summary.json`` records its processes)."""
        return cls(root, fingerprint, int(summary.get("processes") or 1))

    @property
    def exports(self) -> Path:
        return self.dir / "exports"

    def step(self, step: int) -> Path:
        return self.dir / f"step-{step:06d}"

    def export(self, step: int) -> Path:
        return self.exports / f"step-{step:06d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return sorted(
            p for p in self.dir.glob("step-*") if p.is_dir() and (p / "state.json").exists()
        )

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def saved_exports(self) -> dict[int, Path]:
        """``{step: folder}`` of the complete step exports."""
        return saved_exports(self.exports)


def saved_exports(exports_dir: str | os.PathLike) -> dict[int, Path]:
    """``{step: folder}`` of the complete exports in ``exports_dir`` (each is written in a
    hidden temporary folder and renamed, so a listed ``step-NNNNNN`` is complete)."""
    root = Path(exports_dir)
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / LORA_FILE).is_file():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def _te_file(i: int) -> str:
    return "lora_te.safetensors" if i == 0 else f"lora_te{i + 1}.safetensors"


def _fp32(state: dict) -> dict:
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save(layout: Layout, step: int, fingerprint: str, lora: dict, text_loras: list[dict],
         opt, sched, scaler, metrics: list[dict]) -> Path:  # fmt: skip
    """Write checkpoint ``step`` (atomically: a hidden folder renamed into place) and drop all
    but the last `KEEP`. ``lora``/``text_loras``: peft state dicts of the UNet / text encoders."""
    import torch

    final, tmp = layout.step(step), layout.dir / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(_fp32(lora), tmp / "lora.safetensors")
    for i, state in enumerate(text_loras):
        save_safetensors(_fp32(state), tmp / _te_file(i))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "lr_scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
    }
    (tmp / "state.json").write_text(json.dumps(state, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in layout.checkpoints()[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(folder: Path, unet, text_encoders: list, opt, sched, scaler, device) -> tuple:
    """Load checkpoint ``folder`` into the modules and optimizer state; (step, metrics)."""
    import torch
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    set_peft_model_state_dict(unet, load_file(folder / "lora.safetensors", device=str(device)))
    for i, te in enumerate(text_encoders):
        set_peft_model_state_dict(te, load_file(folder / _te_file(i), device=str(device)))
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=device))
    sched.load_state_dict(state["lr_scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]
    return state["step"], metrics
