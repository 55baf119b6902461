"""Export a trained LoRA in the layouts diffusers, AUTOMATIC1111 WebUI and ComfyUI load.

The diffusers file (``pytorch_lora_weights.safetensors``) is written by diffusers'
``save_lora_weights``: ``unet.<module>.lora.down/up.weight`` and, for a text-encoder LoRA,
``text_encoder.text_model.<module>.lora_linear_layer.down/up.weight`` (the names diffusers writes
for transformers 4's CLIPTextModel: diffusers 0.32 needs them, and newer diffusers strips the
``text_model.`` level when its text encoder has none). The LoRA scale alpha / rank is multiplied
into the up weights and ``lora_adapter_metadata`` says lora_alpha = r, so every diffusers gives
the trained strength at scale 1: one that reads the metadata and one that predates it (which
takes alpha = rank). The trained alpha is kept in ``lorapipe_trained_alpha``.

The kohya file has ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha`` (and ``lora_te_text_model_…``) with the trained alpha and the up weights as trained,
and the ``ss_*`` / ``modelspec.*`` metadata sd-scripts writes (its ``train_network.py`` and
``library/sai_model_spec.py``), filled from what the run did. Only safetensors with string
metadata: no pickles anywhere.

SDXL (a UNet config with ``addition_embed_type: text_time``): the diffusers file has
``text_encoder_2.…`` keys for the second encoder's LoRA (diffusers'
``StableDiffusionXLPipeline.save_lora_weights``); the kohya file names UNet modules as sd-scripts
does for SDXL, by the original (LDM) module paths of ``library/sdxl_original_unet.py``
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``lora_unet_middle_block_1_…``,
``lora_unet_output_blocks_0_1_…``), and the encoders ``lora_te1_text_model_…`` and
``lora_te2_text_model_…`` (sd-scripts' ``LORA_PREFIX_TEXT_ENCODER1/2``; ComfyUI's
``comfy/lora.py`` and A1111's Lora extension map exactly these names).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
from collections import Counter
from pathlib import Path

from .families import FAMILIES, SD, Family, family_of_unet
from .io import save_safetensors

TE_COMPONENTS = ("text_encoder", "text_encoder_2")
SUFFIXES = {
    ".lora.down.weight": "lora_down",
    ".lora.up.weight": "lora_up",
    ".lora_A.weight": "lora_down",
    ".lora_B.weight": "lora_up",
    ".lora_linear_layer.down.weight": "lora_down",  # diffusers' text-encoder layout
    ".lora_linear_layer.up.weight": "lora_up",
}
# kohya's SD-1.x text-encoder names, and the names diffusers writes for a text-encoder LoRA of
# transformers 4's CLIPTextModel, start at CLIPTextModel.text_model; transformers 5's
# CLIPTextModel has no such level (its modules start at encoder.*), so both files get it back.
KOHYA_TE_ROOT = "text_model."
# diffusers-file metadata: the trained adapters' alpha (their scale is in the up weights)
TRAINED_ALPHA_KEY = "lorapipe_trained_alpha"
# The optimizers of `runs.<name>.optimizer`, named as sd-scripts names them (module.class)
OPTIMIZERS = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit"}
MODELSPEC_VERSION = "1.0.1"  # the ModelSpec version sd-scripts writes


def _kohya_alpha(cfg: dict, where: str) -> tuple[float, int]:
    """(kohya alpha, rank) of one adapter's LoraConfig fields (``r``, ``lora_alpha``, ...).

    kohya scales a module by alpha / rank. For a plain LoRA that is peft's lora_alpha; for rsLoRA
    (scale alpha / sqrt(rank)) the equivalent kohya alpha is lora_alpha * sqrt(rank). Per-module
    patterns and DoRA have no kohya equivalent here and are refused rather than exported wrong.
    """
    try:
        alpha, rank = float(cfg["lora_alpha"]), int(cfg["r"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where} has no usable lora_alpha / r: {e!r}") from e
    for key in ("alpha_pattern", "rank_pattern"):
        if cfg.get(key):
            raise ValueError(f"{where}: {key} is set: per-module alpha/rank is not supported")
    if cfg.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters cannot be exported in the kohya LoRA layout")
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(rank)
    return alpha, rank


def _component_fields(packed: dict, component: str) -> dict:
    """The ``<component>.``-prefixed fields of diffusers' packed adapter metadata, unprefixed."""
    pre = f"{component}."
    return {k[len(pre) :]: v for k, v in packed.items() if k.startswith(pre)}


def read_alpha(meta: dict[str, str], component: str = "unet") -> tuple[float, int]:
    """(kohya alpha, rank) of ``component`` as trained, from a diffusers LoRA file's metadata.

    A file lorapipe wrote has the trained alpha in ``lorapipe_trained_alpha`` (its
    ``lora_adapter_metadata`` says alpha = rank: the scale is in the up weights, see
    `weight_scale`); a file of another writer has it in ``lora_adapter_metadata`` only.
    """
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        raise ValueError(
            "diffusers LoRA file has no lora_adapter_metadata: lora_alpha unknown (save it with "
            "save_lora_weights(..., unet_lora_adapter_metadata=...))"
        )
    try:
        packed = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"lora_adapter_metadata is not JSON: {e!r}") from e
    where = f"lora_adapter_metadata ({component}.)"
    alpha, rank = _kohya_alpha(_component_fields(packed, component), where)
    trained = json.loads(meta.get(TRAINED_ALPHA_KEY) or "{}").get(component)
    if trained is None:
        return alpha, rank
    t_alpha, t_rank = _kohya_alpha(trained, f"{TRAINED_ALPHA_KEY} ({component})")
    if t_rank != rank or alpha != rank:
        raise ValueError(
            f"{component}: {TRAINED_ALPHA_KEY} (r={t_rank}) does not fit lora_adapter_metadata "
            f"(r={rank}, lora_alpha={alpha}; a scale in the weights needs lora_alpha = r)"
        )
    return t_alpha, t_rank


def weight_scale(meta: dict[str, str], component: str = "unet") -> float:
    """The factor already multiplied into ``component``'s up weights: trained alpha / rank for a
    file lorapipe wrote (``lorapipe_trained_alpha``), 1.0 for a file of another writer."""
    if component not in json.loads(meta.get(TRAINED_ALPHA_KEY) or "{}"):
        return 1.0
    alpha, rank = read_alpha(meta, component)
    return alpha / rank


def _num(x: float) -> str:
    """8.0 -> "8", 0.5 -> "0.5" (how kohya's metadata spells dim and alpha)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _family(unet_config: dict | None) -> Family:
    """The family whose kohya names an export uses: its UNet config's (SD-1.x without one)."""
    return family_of_unet(unet_config) or SD()


def _kohya_key(key: str, unet_config: dict | None = None) -> tuple[str, str, str]:
    """(component, kohya module name, lora_down|lora_up) of a diffusers LoRA key, named as the
    family of ``unet_config`` names them (`Family.kohya_prefixes`, `Family.kohya_unet_module`)."""
    family = _family(unet_config)
    prefixes = family.kohya_prefixes
    component, _, rest = key.partition(".")
    if component not in prefixes or not rest:
        raise ValueError(f"unexpected key {key!r}: component must be one of {list(prefixes)}")
    match = [
        (rest[: -len(sfx)], kohya)
        for sfx, kohya in SUFFIXES.items()
        if rest.endswith(sfx) and len(rest) > len(sfx)
    ]
    if not match:
        raise ValueError(f"unexpected key {key!r}: not a LoRA down/up weight")
    module, kohya = match[0]
    if component in TE_COMPONENTS and not module.startswith(KOHYA_TE_ROOT):
        module = KOHYA_TE_ROOT + module
    if component == "unet":
        module = family.kohya_unet_module(module, unet_config)
    return component, prefixes[component] + module.replace(".", "_"), kohya


def _check_layout(meta: dict[str, str], unet_config: dict | None) -> None:
    """kohya's names follow the family: a LoRA whose metadata names another family than its
    UNet config's (an SDXL LoRA exported without its UNet config) is refused, not guessed."""
    version = str(meta.get("ss_base_model_version", ""))
    claimed = [f for f in FAMILIES if f.base_version_prefix and version.startswith(
        f.base_version_prefix)]  # fmt: skip
    if claimed and _family(unet_config).name != claimed[0].name:
        raise ValueError(
            f"a {claimed[0].title} LoRA (ss_base_model_version {version}): kohya names need "
            "the base model's UNet config"
        )


def kohya_state_dict(tensors: dict, meta: dict[str, str], unet_config: dict | None = None) -> dict:
    """Map diffusers keys to kohya keys and add one ``.alpha`` tensor per module.

    The trained alpha goes into ``.alpha``; up weights that carry the scale (`weight_scale`) are
    divided by it again, so kohya's loaders (alpha / rank times up @ down) apply it once.
    ``unet_config``: the base model's UNet config; SDXL's gives sd-scripts' SDXL names.
    """
    import torch

    _check_layout(meta, unet_config)
    out = {}
    ranks: dict[str, int] = {}
    for key, value in tensors.items():
        component, name, kohya = _kohya_key(key, unet_config)
        if f"{name}.{kohya}.weight" in out:
            raise ValueError(f"unexpected key {key!r}: a second {kohya} weight for {name}")
        scale = weight_scale(meta, component)
        if kohya == "lora_up" and scale != 1.0:
            value = value / scale
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


# --- the base model's family: kohya's and ModelSpec's labels ---------------------------------
# (each family's own, `Family.architecture`; no torch)


def architecture_metadata(unet_config: dict, scheduler_config: dict) -> dict[str, str]:
    """kohya's and ModelSpec's labels of a base model (`Family.architecture` of its UNet
    config's family), from its diffusers configs as dicts (unet/config.json,
    scheduler/scheduler_config.json). Empty without a UNet config: nothing is guessed."""
    if not unet_config:
        return {}
    return _family(unet_config).architecture(unet_config, scheduler_config or {})


# --- kohya / ModelSpec metadata --------------------------------------------------------------


def _optimizer(run_cfg: dict) -> str:
    """``ss_optimizer`` as sd-scripts spells it: ``module.Class(key=value,...)``."""
    name = run_cfg.get("optimizer", "adamw")
    args = {
        "weight_decay": run_cfg.get("weight_decay"),
        "betas": (run_cfg.get("adam_beta1"), run_cfg.get("adam_beta2")),
        "eps": run_cfg.get("adam_epsilon"),
    }
    args = {k: v for k, v in args.items() if v is not None and v != (None, None)}
    joined = ",".join(f"{k}={v}" for k, v in args.items())
    return OPTIMIZERS.get(name, name) + (f"({joined})" if joined else "")


def _run_fields(run_cfg: dict) -> dict[str, str]:
    """The ``ss_*`` fields that come from the run's settings alone."""
    dropout = run_cfg.get("lora_dropout") or 0
    targets = ",".join(run_cfg.get("target_modules", ()))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dropout": str(dropout) if dropout else "None",
        "ss_network_args": json.dumps({"target_modules": targets}),
        "ss_sd_model_name": str(run_cfg["base_model"]),
        "ss_output_name": str(run_cfg["name"]),
        "ss_learning_rate": str(run_cfg["learning_rate"]),
        "ss_unet_lr": str(run_cfg["learning_rate"]),
        "ss_optimizer": _optimizer(run_cfg),
        "ss_lr_scheduler": str(run_cfg["lr_scheduler"]),
        "ss_lr_warmup_steps": str(run_cfg["warmup_steps"]),
        "ss_batch_size_per_device": str(run_cfg["batch_size"]),
        "ss_gradient_accumulation_steps": str(run_cfg["gradient_accumulation"]),
        "ss_gradient_checkpointing": str(bool(run_cfg.get("gradient_checkpointing"))),
        "ss_max_grad_norm": str(run_cfg.get("max_grad_norm")),
        "ss_seed": str(run_cfg["seed"]),
        "ss_min_snr_gamma": str(run_cfg["min_snr_gamma"]),
        "ss_noise_offset": str(run_cfg["noise_offset"]),
        "ss_caption_dropout_rate": str(run_cfg["caption_dropout"]),
        "ss_clip_skip": str(run_cfg.get("clip_skip") or 1),  # the text encoder's last layer
        "ss_cache_latents": "True",
        "ss_full_fp16": "False",  # LoRA weights stay float32 under autocast
        "ss_num_reg_images": "0",
        "ss_reg_dataset_dirs": "{}",
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.implementation": "diffusers",
    }
    if run_cfg.get("mixed_precision") not in (None, "auto"):  # else: the train stage's choice
        meta["ss_mixed_precision"] = str(run_cfg["mixed_precision"])
    if run_cfg.get("max_steps"):
        meta["ss_max_train_steps"] = str(run_cfg["max_steps"])
    return meta


def kohya_metadata(
    run_cfg: dict,
    extra: dict[str, str],
    tag_frequency: dict,
    rank_alpha: tuple[int, float] | None = None,
    text_encoder: bool | None = None,
) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` fields sd-scripts writes, plus lorapipe's trace fields.

    All values are strings. ``extra`` (`runs.file_metadata`, `train_metadata`: what the run
    really did) wins over what the run's settings say. ``rank_alpha`` (rank, kohya alpha), read
    from the LoRA file itself, wins over the run config; so does ``text_encoder`` (whether the
    file has a text-encoder LoRA) over ``train_text_encoder``. ``ss_text_encoder_lr`` is the text
    encoder's learning rate when it was trained, else "0". ``ss_dataset_dirs`` comes from
    ``ss_num_train_images`` when ``extra`` has that, keyed like ``ss_tag_frequency`` (the
    dataset); ``modelspec.title`` is the output name.
    """
    rank, alpha = rank_alpha or (run_cfg["lora_rank"], run_cfg["lora_alpha"])
    if text_encoder is None:
        text_encoder = bool(run_cfg.get("train_text_encoder"))
    te_lr = run_cfg.get("text_encoder_lr")
    te_lr = (run_cfg["learning_rate"] if te_lr is None else te_lr) if text_encoder else 0
    meta = _run_fields(run_cfg)
    meta.update(
        {
            "ss_network_dim": _num(rank),
            "ss_network_alpha": _num(alpha),
            "ss_text_encoder_lr": str(te_lr),
            "ss_tag_frequency": json.dumps(tag_frequency, sort_keys=True, ensure_ascii=False),
        }
    )
    meta.update({k: str(v) for k, v in extra.items()})
    if "ss_num_train_images" in meta and "ss_dataset_dirs" not in meta:
        key = meta.get("lorapipe_dataset") or str(run_cfg["dataset"])
        dirs = {key: {"n_repeats": 1, "img_count": int(meta["ss_num_train_images"])}}
        meta["ss_dataset_dirs"] = json.dumps(dirs, ensure_ascii=False)
    meta.setdefault("modelspec.title", meta["ss_output_name"])
    return dict(sorted(meta.items()))


def bucket_info(metas) -> dict:
    """sd-scripts' ``ss_bucket_info`` of the trained images: ``{"buckets": {"0": {"resolution":
    [w, h], "count": n}, ...}, "mean_img_ar_error": e}``.

    ``metas``: one dict per image with its bucket ``size`` [w, h] and ``original_size`` (a shard
    index row, or a latent sample's ``meta``). Buckets are numbered in aspect order; the error
    is the mean of |bucket aspect - image aspect| over the images, as sd-scripts computes it.
    """
    counts: Counter = Counter()
    errors = []
    for m in metas:
        w, h = m["size"]
        counts[(int(w), int(h))] += 1
        if m.get("original_size"):
            ow, oh = m["original_size"]
            errors.append(abs(w / h - ow / oh))
    order = sorted(counts, key=lambda s: (s[0] / s[1], s[0]))
    buckets = {str(i): {"resolution": list(s), "count": counts[s]} for i, s in enumerate(order)}
    return {
        "buckets": buckets,
        "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0,
    }


def _utc_iso(t: float) -> str:
    """ModelSpec's date: ISO-8601, whole seconds, UTC (sd-scripts writes local time, no zone)."""
    return datetime.datetime.fromtimestamp(int(t), datetime.timezone.utc).isoformat()


def train_metadata(facts: dict, run_cfg: dict) -> dict[str, str]:
    """The ``ss_*`` fields of what training did, from ``facts`` (train_summary.json's keys).

    Each present key gives its field: ``steps``, ``epochs`` (and ``epoch``, the current one of a
    checkpoint; default ``epochs``), ``precision`` (the mixed precision used: no, fp16, bf16),
    ``samples`` (images trained on), ``max_steps``, ``processes`` (total batch size),
    ``started_at`` / ``finished_at`` (unix times of this training session; the finish time is
    also ModelSpec's date), ``bucket_info`` (`bucket_info`) and ``batches_per_epoch`` (counted
    from the buckets when missing, as training plans them).
    """
    out: dict[str, str] = {}
    simple = {"steps": "ss_steps", "epochs": "ss_num_epochs", "precision": "ss_mixed_precision",
              "samples": "ss_num_train_images", "max_steps": "ss_max_train_steps",
              "started_at": "ss_training_started_at", "finished_at": "ss_training_finished_at",
              "batches_per_epoch": "ss_num_batches_per_epoch"}  # fmt: skip
    for key, field in simple.items():
        if facts.get(key) is not None:
            out[field] = str(facts[key])
    if facts.get("epochs") is not None:
        out["ss_epoch"] = str(facts.get("epoch") or facts["epochs"])
    world = int(facts.get("processes") or 1)
    if facts.get("processes") is not None:
        total = run_cfg.get("batch_size", 1) * world * run_cfg.get("gradient_accumulation", 1)
        out["ss_total_batch_size"] = str(total)
    if facts.get("finished_at") is not None:
        out["modelspec.date"] = _utc_iso(float(facts["finished_at"]))
    info = facts.get("bucket_info")
    if info:
        out["ss_bucket_info"] = json.dumps(info)
        if facts.get("batches_per_epoch") is None:
            per_batch = run_cfg.get("batch_size", 1) * world
            n = sum(math.ceil(b["count"] / per_batch) for b in info["buckets"].values())
            out["ss_num_batches_per_epoch"] = str(n)
    return out


def tag_counts(captions, dataset: str) -> dict:
    """kohya's ss_tag_frequency: ``{dataset: {tag: count}}`` of the comma-separated tags,
    stripped and lower-cased as sd-scripts counts them."""
    counts: Counter = Counter()
    for cap in captions:
        counts.update(t.strip().lower() for t in cap.split(",") if t.strip())
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


def bake_scale(layers: dict, adapter_meta: dict, component: str) -> tuple[dict, dict, dict]:
    """Multiply a LoRA's scale into its up weights, for loaders that take the scale as 1.

    ``layers``: diffusers-layout weights of one adapter; ``adapter_meta``: its LoraConfig as a
    dict (`models.adapter_metadata`). Returns (the layers with every up weight times alpha / r
    (or alpha / sqrt(r) for rsLoRA; untouched when that is 1), the adapter metadata with
    lora_alpha = r and use_rslora off, so a loader that reads it scales by 1 too, and the
    trained ``lora_alpha`` / ``r`` / ``use_rslora`` for ``lorapipe_trained_alpha``).
    """
    alpha, rank = _kohya_alpha(adapter_meta, f"{component} adapter")
    scale = alpha / rank
    up = tuple(s for s, kind in SUFFIXES.items() if kind == "lora_up")
    baked = {k: v * scale if scale != 1.0 and k.endswith(up) else v for k, v in layers.items()}
    meta = {**adapter_meta, "lora_alpha": rank, "use_rslora": False}
    trained = {k: adapter_meta.get(k) for k in ("lora_alpha", "r")}
    trained["use_rslora"] = bool(adapter_meta.get("use_rslora"))
    return baked, meta, trained


def _te_layers(layers: dict) -> dict:
    """Text-encoder LoRA keys as diffusers writes them for transformers 4's CLIPTextModel
    (``text_model.encoder.layers…``), whichever transformers the weights came from."""
    return {k if k.startswith(KOHYA_TE_ROOT) else KOHYA_TE_ROOT + k: v for k, v in layers.items()}


def save_diffusers_lora(
    peft_state: dict,
    adapter_metadata: dict,
    out_file: str | os.PathLike,
    extra_meta: dict[str, str] | None = None,
    te_peft_state: dict | None = None,
    te_adapter_metadata: dict | None = None,
    te2_peft_state: dict | None = None,
) -> tuple[dict, dict[str, str]]:
    """Write a UNet LoRA (and a text-encoder one) as diffusers' ``save_lora_weights`` does, plus
    lorapipe's metadata.

    ``peft_state`` is ``get_peft_model_state_dict(unet)`` (of the uncompiled UNet);
    ``te_peft_state`` the text encoder's, when it was trained (``te2_peft_state``: SDXL's second
    encoder's, with the same adapter config, written as diffusers'
    ``StableDiffusionXLPipeline.save_lora_weights`` writes it: ``text_encoder_2.…``);
    text-encoder keys get the names diffusers writes for one (`_te_layers`). Each adapter's
    scale goes into its up weights (`bake_scale`): diffusers with and without
    ``lora_adapter_metadata`` support load it at the trained strength;
    ``lorapipe_trained_alpha`` keeps the trained alpha for the kohya export. diffusers writes
    the file (its key layout and ``lora_adapter_metadata``); it is then
    rewritten with ``extra_meta`` merged in, atomically and with a sorted, byte-reproducible
    header. No pipeline is loaded. Returns the tensors and metadata written.
    """
    import shutil

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors import safe_open

    def layers(state):
        return {
            k: v.detach().float().cpu().contiguous()
            for k, v in convert_state_dict_to_diffusers(state).items()
        }

    lora, unet_meta, trained_unet = bake_scale(layers(peft_state), adapter_metadata, "unet")
    trained = {"unet": trained_unet}
    te_kw = {}
    for component, state in (("text_encoder", te_peft_state), ("text_encoder_2", te2_peft_state)):
        if state is None:
            continue
        te_layers, te_meta, trained[component] = bake_scale(
            _te_layers(layers(state)), te_adapter_metadata or {}, component
        )
        te_kw[f"{component}_lora_layers"] = te_layers
        te_kw[f"{component}_lora_adapter_metadata"] = te_meta
    writer = StableDiffusionXLPipeline if te2_peft_state is not None else StableDiffusionPipeline
    out_file = Path(out_file)
    staging = out_file.parent / f".{out_file.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        writer.save_lora_weights(
            staging, unet_lora_layers=lora, unet_lora_adapter_metadata=unet_meta, **te_kw
        )
        with safe_open(str(staging / "pytorch_lora_weights.safetensors"), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta[TRAINED_ALPHA_KEY] = json.dumps(trained, sort_keys=True)
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
    unet_config: dict | None = None,
) -> int:
    """Write the kohya-layout file of a diffusers LoRA (its tensors and metadata); returns the
    number of tensors. ``unet_config``: the base model's (SDXL's gives SDXL names)."""
    _check_layout(extra_meta, unet_config)
    sd = kohya_state_dict(tensors, meta, unet_config)
    alpha, rank = read_alpha(meta, "unet")
    te = any(k.startswith("lora_te") for k in sd)
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
    unet_config: dict | None = None,
) -> int:
    """Write the kohya-layout file next to the diffusers one; returns the number of tensors.
    ``unet_config``: the base model's UNet config (needed for SDXL's names)."""
    from safetensors import safe_open

    with safe_open(str(diffusers_file), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    freq = tag_frequency(list(caption_jsonls), dataset)
    return save_kohya(tensors, meta, out_file, run_cfg, extra_meta, freq, unet_config)


def export_checkpoint(
    peft_state: dict,
    adapter_metadata: dict,
    out_dir: str | os.PathLike,
    run_cfg: dict,
    extra_meta: dict[str, str],
    tag_freq: dict,
    te_peft_state: dict | None = None,
    te_adapter_metadata: dict | None = None,
    te2_peft_state: dict | None = None,
    unet_config: dict | None = None,
) -> Path:
    """Both LoRA files of an intermediate checkpoint, written into a fresh ``out_dir``.

    ``pytorch_lora_weights.safetensors`` (diffusers) and ``<run>-step<NNNNNN>.safetensors``
    (kohya, named from ``extra_meta["ss_steps"]``), so any saved step can be loaded and
    compared in diffusers, WebUI or ComfyUI. With ``te_peft_state`` (and SDXL's
    ``te2_peft_state``) both carry the text-encoder LoRA too; ``unet_config`` is the base
    model's (SDXL's gives sd-scripts' SDXL names). The diffusers file gets the ``lorapipe_*``
    fields of ``extra_meta``, the kohya file all of them. Written in a temporary folder, then
    renamed: the folder is complete or absent.
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
        te_peft_state, te_adapter_metadata, te2_peft_state,
    )  # fmt: skip
    save_kohya(tensors, meta, tmp / f"{name}.safetensors", run_cfg, extra, tag_freq, unet_config)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
