"""Export a trained LoRA in the kohya layout that AUTOMATIC1111 WebUI and ComfyUI load.

Input is the diffusers file the train stage writes (``unet.<module>.lora.down.weight`` keys, the
adapter config with lora_alpha in its metadata). Output keys are
``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (and
``lora_te_…`` for a text-encoder LoRA). Unlike diffusers' own converter, the real trained alpha is
written (not alpha = rank) and the ``lora_unet_`` / SD-1.x ``lora_te_`` prefixes are always right.
Only safetensors with string metadata: no pickles anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections import Counter
from pathlib import Path

from .io import save_safetensors

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SUFFIXES = {
    ".lora.down.weight": "lora_down",
    ".lora.up.weight": "lora_up",
    ".lora_A.weight": "lora_down",
    ".lora_B.weight": "lora_up",
    ".lora_linear_layer.down.weight": "lora_down",  # diffusers' text-encoder layout
    ".lora_linear_layer.up.weight": "lora_up",
}
# kohya's SD-1.x text-encoder names start at CLIPTextModel.text_model; transformers 5's
# CLIPTextModel has no such level (its modules start at encoder.*), so kohya names get it back.
KOHYA_TE_ROOT = "text_model."


def read_alpha(meta: dict[str, str], component: str = "unet") -> tuple[float, int]:
    """(kohya alpha, rank) of ``component`` from a diffusers LoRA file's metadata.

    kohya scales a module by alpha / rank. For a plain LoRA that is peft's lora_alpha; for rsLoRA
    (scale alpha / sqrt(rank)) the equivalent kohya alpha is lora_alpha * sqrt(rank). Per-module
    patterns and DoRA have no kohya equivalent here and are refused rather than exported wrong.
    """
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        raise ValueError(
            "diffusers LoRA file has no lora_adapter_metadata: lora_alpha unknown (save it with "
            "save_lora_weights(..., unet_lora_adapter_metadata=...))"
        )
    try:
        cfg = json.loads(raw)
        alpha, rank = float(cfg[f"{component}.lora_alpha"]), int(cfg[f"{component}.r"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"lora_adapter_metadata has no usable {component}.lora_alpha / {component}.r: {e!r}"
        ) from e
    for key in ("alpha_pattern", "rank_pattern"):
        if cfg.get(f"{component}.{key}"):
            raise ValueError(f"{component}.{key} is set: per-module alpha/rank is not supported")
    if cfg.get(f"{component}.use_dora"):
        raise ValueError(f"{component}: DoRA adapters cannot be exported in the kohya LoRA layout")
    if cfg.get(f"{component}.use_rslora"):
        alpha *= math.sqrt(rank)
    return alpha, rank


def _num(x: float) -> str:
    """8.0 -> "8", 0.5 -> "0.5" (how kohya's metadata spells dim and alpha)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def kohya_state_dict(tensors: dict, meta: dict[str, str]) -> dict:
    """Map diffusers keys to kohya keys and add one ``.alpha`` tensor per module."""
    import torch

    out = {}
    ranks: dict[str, int] = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component not in PREFIXES or not rest:
            raise ValueError(f"unexpected key {key!r}: component must be one of {list(PREFIXES)}")
        match = [
            (rest[: -len(sfx)], kohya)
            for sfx, kohya in SUFFIXES.items()
            if rest.endswith(sfx) and len(rest) > len(sfx)
        ]
        if not match:
            raise ValueError(f"unexpected key {key!r}: not a LoRA down/up weight")
        module, kohya = match[0]
        if component == "text_encoder" and not module.startswith(KOHYA_TE_ROOT):
            module = KOHYA_TE_ROOT + module
        name = PREFIXES[component] + module.replace(".", "_")
        if f"{name}.{kohya}.weight" in out:
            raise ValueError(f"unexpected key {key!r}: a second {kohya} weight for {name}")
        out[f"{name}.{kohya}.weight"] = value.contiguous()
        if f"{name}.alpha" not in out:
            alpha, ranks[name] = read_alpha(meta, component)
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    for name, rank in ranks.items():
        down, up = out.get(f"{name}.lora_down.weight"), out.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise ValueError(f"{name}: has only one of lora_down/lora_up")
        if down.shape[0] != rank or up.shape[1] != rank:
            raise ValueError(
                f"{name}: weights have rank {down.shape[0]}/{up.shape[1]}, metadata says r={rank}"
            )
    return dict(sorted(out.items()))


def safetensors_hashes(sd: dict, meta: dict[str, str]) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` and ``sshs_legacy_hash`` (as sd-scripts precalculates them).

    model hash: sha256 of the tensor data after the header, serialized with the ``ss_*`` metadata
    only; legacy hash: first 8 hex digits of sha256 of 64 KiB at offset 1 MiB of the same bytes.
    """
    from safetensors.torch import save

    data = save(sd, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    model = hashlib.sha256(data[8 + n :]).hexdigest()
    b = io.BytesIO(data)
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    return model, legacy


def kohya_metadata(
    run_cfg: dict,
    extra: dict[str, str],
    tag_frequency: dict,
    rank_alpha: tuple[int, float] | None = None,
    text_encoder: bool | None = None,
) -> dict[str, str]:
    """The ``ss_*`` fields UIs display, plus lorapipe's trace fields. All values are strings.

    ``rank_alpha`` (rank, kohya alpha), read from the LoRA file itself, wins over the run config;
    so does ``text_encoder`` (whether the file has a text-encoder LoRA) over
    ``train_text_encoder``. ``ss_text_encoder_lr`` is the text encoder's learning rate when it
    was trained, else "0".
    """
    rank, alpha = rank_alpha or (run_cfg["lora_rank"], run_cfg["lora_alpha"])
    if text_encoder is None:
        text_encoder = bool(run_cfg.get("train_text_encoder"))
    te_lr = run_cfg.get("text_encoder_lr")
    te_lr = (run_cfg["learning_rate"] if te_lr is None else te_lr) if text_encoder else 0
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _num(rank),
        "ss_network_alpha": _num(alpha),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": str(run_cfg["base_model"]),
        "ss_output_name": str(run_cfg["name"]),
        "ss_learning_rate": str(run_cfg["learning_rate"]),
        "ss_unet_lr": str(run_cfg["learning_rate"]),
        "ss_text_encoder_lr": str(te_lr),
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
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def tag_counts(captions, dataset: str) -> dict:
    """kohya's ss_tag_frequency: ``{dataset: {tag: count}}`` with comma-separated tags."""
    counts: Counter = Counter()
    for cap in captions:
        counts.update(t.strip() for t in cap.split(",") if t.strip())
    return {dataset: dict(sorted(counts.items()))}


def tag_frequency(caption_jsonls: list[str], dataset: str) -> dict:
    """`tag_counts` of the captions in caption .jsonl files."""

    def captions():
        for p in caption_jsonls:
            with open(p, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)["caption"]

    return tag_counts(captions(), dataset)


def save_diffusers_lora(
    peft_state: dict,
    adapter_metadata: dict,
    out_file: str | os.PathLike,
    extra_meta: dict[str, str] | None = None,
    te_peft_state: dict | None = None,
    te_adapter_metadata: dict | None = None,
) -> tuple[dict, dict[str, str]]:
    """Write a UNet LoRA (and a text-encoder one) as diffusers' ``save_lora_weights`` does, plus
    lorapipe's metadata.

    ``peft_state`` is ``get_peft_model_state_dict(unet)`` (of the uncompiled UNet);
    ``te_peft_state`` the text encoder's, when it was trained (``text_encoder.…`` keys). diffusers
    writes the file (its key layout and ``lora_adapter_metadata``, with lora_alpha); it is then
    rewritten with ``extra_meta`` merged in, atomically and with a sorted, byte-reproducible
    header. No pipeline is loaded. Returns the tensors and metadata written.
    """
    import shutil

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors import safe_open

    def layers(state):
        return {
            k: v.detach().float().cpu().contiguous()
            for k, v in convert_state_dict_to_diffusers(state).items()
        }

    lora = layers(peft_state)
    te_kw = {}
    if te_peft_state is not None:
        te_kw = {
            "text_encoder_lora_layers": layers(te_peft_state),
            "text_encoder_lora_adapter_metadata": te_adapter_metadata,
        }
    out_file = Path(out_file)
    staging = out_file.parent / f".{out_file.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        StableDiffusionPipeline.save_lora_weights(
            staging, unet_lora_layers=lora, unet_lora_adapter_metadata=adapter_metadata, **te_kw
        )
        with safe_open(str(staging / "pytorch_lora_weights.safetensors"), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
    save_safetensors(tensors, out_file, metadata=meta)
    return tensors, meta


def save_kohya(
    tensors: dict,
    meta: dict[str, str],
    out_file: str | os.PathLike,
    run_cfg: dict,
    extra_meta: dict[str, str],
    tag_freq: dict,
) -> int:
    """Write the kohya-layout file of a diffusers LoRA (its tensors and metadata); returns the
    number of tensors."""
    sd = kohya_state_dict(tensors, meta)
    alpha, rank = read_alpha(meta, "unet")
    te = any(k.startswith(PREFIXES["text_encoder"]) for k in sd)
    md = kohya_metadata(run_cfg, extra_meta, tag_freq, (rank, alpha), text_encoder=te)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = safetensors_hashes(sd, md)
    save_safetensors(sd, out_file, metadata=md)
    return len(sd)


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

    with safe_open(str(diffusers_file), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    freq = tag_frequency(list(caption_jsonls), dataset)
    return save_kohya(tensors, meta, out_file, run_cfg, extra_meta, freq)


def export_checkpoint(
    peft_state: dict,
    adapter_metadata: dict,
    out_dir: str | os.PathLike,
    run_cfg: dict,
    extra_meta: dict[str, str],
    tag_freq: dict,
    te_peft_state: dict | None = None,
    te_adapter_metadata: dict | None = None,
) -> Path:
    """Both LoRA files of an intermediate checkpoint, written into a fresh ``out_dir``.

    ``pytorch_lora_weights.safetensors`` (diffusers) and ``<run>-step<NNNNNN>.safetensors``
    (kohya, named from ``extra_meta["ss_steps"]``), so any saved step can be loaded and
    compared in diffusers, WebUI or ComfyUI. With ``te_peft_state`` both carry the text-encoder
    LoRA too. The diffusers file gets the ``lorapipe_*`` fields of ``extra_meta``, the kohya file
    all of them. Written in a temporary folder, then renamed: the
    folder is complete or absent.
    """
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = f"{run_cfg['name']}-step{int(extra_meta['ss_steps']):06d}"
    extra = {**extra_meta, "ss_output_name": name}
    trace = {k: v for k, v in extra.items() if k.startswith("lorapipe_")}
    tensors, meta = save_diffusers_lora(
        peft_state, adapter_metadata, tmp / "pytorch_lora_weights.safetensors", trace,
        te_peft_state, te_adapter_metadata,
    )  # fmt: skip
    save_kohya(tensors, meta, tmp / f"{name}.safetensors", run_cfg, extra, tag_freq)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def add_metadata(path: str | os.PathLike, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with ``extra`` merged into its string metadata (atomically)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update({k: str(v) for k, v in extra.items()})
    save_safetensors(tensors, path, metadata=meta)
