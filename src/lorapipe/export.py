"""Export a trained LoRA in the kohya layout that AUTOMATIC1111 WebUI and ComfyUI load.

Input is the diffusers file the train stage writes (``unet.<module>.lora.down.weight`` keys, the
adapter config with lora_alpha in its metadata). Output keys are
``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (and
``lora_te_…`` for a text-encoder LoRA). Unlike diffusers' own converter, the real trained alpha is
written (not alpha = rank) and the ``lora_unet_`` / SD-1.x ``lora_te_`` prefixes are always right.
Only safetensors with string metadata: no pickles anywhere.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .io import atomic_path

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def read_alpha(meta: dict[str, str], component: str = "unet") -> tuple[float, int]:
    """(lora_alpha, rank) of ``component`` from a diffusers LoRA file's metadata."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        raise ValueError("diffusers LoRA file has no lora_adapter_metadata: alpha unknown")
    cfg = json.loads(raw)
    return float(cfg[f"{component}.lora_alpha"]), int(cfg[f"{component}.r"])


def kohya_state_dict(tensors: dict, meta: dict[str, str]) -> dict:
    """Map diffusers keys to kohya keys and add one ``.alpha`` tensor per module."""
    import torch

    out = {}
    for key, value in tensors.items():
        component, rest = key.split(".", 1)
        if component not in PREFIXES:
            raise ValueError(f"unexpected key {key!r}: component must be one of {list(PREFIXES)}")
        for suffix, kohya in ((".lora.down.weight", "lora_down"), (".lora.up.weight", "lora_up"),
                              (".lora_A.weight", "lora_down"), (".lora_B.weight", "lora_up")):
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                break
        else:
            raise ValueError(f"unexpected key {key!r}: not a LoRA down/up weight")
        name = PREFIXES[component] + module.replace(".", "_")
        out[f"{name}.{kohya}.weight"] = value.contiguous()
        if f"{name}.alpha" not in out:
            alpha, _ = read_alpha(meta, component)
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return dict(sorted(out.items()))


def kohya_metadata(run_cfg: dict, extra: dict[str, str], tag_frequency: dict) -> dict[str, str]:
    """The ``ss_*`` fields UIs display, plus lorapipe's trace fields. All values are strings."""
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(run_cfg["lora_rank"]),
        "ss_network_alpha": str(run_cfg["lora_alpha"]),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": str(run_cfg["base_model"]),
        "ss_output_name": str(run_cfg["name"]),
        "ss_learning_rate": str(run_cfg["learning_rate"]),
        "ss_unet_lr": str(run_cfg["learning_rate"]),
        "ss_text_encoder_lr": "0",
        "ss_lr_scheduler": str(run_cfg["lr_scheduler"]),
        "ss_lr_warmup_steps": str(run_cfg["warmup_steps"]),
        "ss_batch_size_per_device": str(run_cfg["batch_size"]),
        "ss_gradient_accumulation_steps": str(run_cfg["gradient_accumulation"]),
        "ss_mixed_precision": str(run_cfg["mixed_precision"]),
        "ss_seed": str(run_cfg["seed"]),
        "ss_min_snr_gamma": str(run_cfg["min_snr_gamma"]),
        "ss_noise_offset": str(run_cfg["noise_offset"]),
        "ss_caption_dropout_rate": str(run_cfg["caption_dropout"]),
        "ss_tag_frequency": json.dumps(tag_frequency, sort_keys=True, ensure_ascii=False),
        "sshs_legacy_hash": "",
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def tag_frequency(caption_jsonls: list[str], dataset: str) -> dict:
    """kohya's ss_tag_frequency: ``{dataset: {tag: count}}`` with comma-separated tags."""
    counts: Counter = Counter()
    for p in caption_jsonls:
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    cap = json.loads(line)["caption"]
                    counts.update(t.strip() for t in cap.split(",") if t.strip())
    return {dataset: dict(sorted(counts.items()))}


def export_kohya(
    diffusers_file: str | os.PathLike,
    out_file: str | os.PathLike,
    run_cfg: dict,
    extra_meta: dict[str, str],
    caption_jsonls: list[str] = (),
    dataset: str = "",
) -> int:
    """Write the kohya-layout file next to the diffusers one; returns the number of tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(diffusers_file), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    sd = kohya_state_dict(tensors, meta)
    md = kohya_metadata(run_cfg, extra_meta, tag_frequency(list(caption_jsonls), dataset))
    steps = extra_meta.get("ss_steps")
    if steps:
        md["ss_steps"] = steps
    with atomic_path(out_file) as tmp:
        save_file(sd, str(tmp), metadata=md)
    return len(sd)


def add_metadata(path: str | os.PathLike, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with ``extra`` merged into its string metadata (atomically)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update({k: str(v) for k, v in extra.items()})
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
