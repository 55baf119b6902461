"""Precompute, per shard, the VAE latent distribution and the text-encoder output of each caption.

Stored per sample as ``<key>.latents.safetensors`` holding ``mean`` and ``logvar`` (so training
draws a fresh latent sample every step instead of re-using one frozen sample) and ``text`` (the
last hidden state for the caption), next to ``<key>.json`` with the sample's metadata. In the
workflow each latent tar has a checksum sidecar ``<shard>.tar.sha256``; training verifies it and
decodes every sample before the first step, so a damaged shard is refused, never trained on.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

from .io import (
    CorruptFileError,
    atomic_paths,
    canonical_safetensors,
    checksum_line,
    checksum_path,
    discard,
    remove_stale_temps,
    sha256_file,
    verify_file,
)

log = logging.getLogger(__name__)


def encode_shard(
    shard_tar: str | os.PathLike,
    model_path: str | os.PathLike,
    out_tar: str | os.PathLike,
    batch_size: int = 8,
    dtype: str = "float32",
    checksum: bool = False,
    original_config: str | None = None,
) -> int:
    """Encode one image shard into a latent shard; returns the number of samples.

    The image shard is checked against its checksum sidecar first, when it has one; ``checksum``
    also writes ``<out_tar>.sha256``, committed after the tar.
    """
    import numpy as np
    import torch
    import webdataset as wds
    from safetensors.torch import save

    from .models import load_parts, part_fingerprint
    from .shards import read_samples

    outs = [out_tar] + ([checksum_path(out_tar)] if checksum else [])
    remove_stale_temps(*outs)
    verify_file(shard_tar)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    store_dtype = getattr(torch, dtype)
    parts = load_parts(model_path, ("vae", "text_encoder", "tokenizer"), original_config)
    vae, te, tok = parts["vae"].to(device).eval(), parts["text_encoder"].to(device).eval(), parts[
        "tokenizer"
    ]
    vae_id = part_fingerprint(model_path, "vae")[:16]
    te_id = part_fingerprint(model_path, "text_encoder")[:16]
    samples = list(read_samples(shard_tar))
    by_size: dict[tuple, list] = defaultdict(list)
    for s in samples:
        by_size[tuple(s[2]["size"])].append(s)
    encoded: dict[str, tuple[dict, bytes]] = {}
    with torch.inference_mode():
        for size in sorted(by_size):
            group = by_size[size]
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                pixels = np.stack([np.asarray(img, dtype=np.float32) for _, img, _ in chunk])
                x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device) / 127.5 - 1.0
                dist = vae.encode(x).latent_dist
                ids = tok(
                    [m["caption"] for _, _, m in chunk],
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(device)
                text = te(ids)[0]
                for j, (key, _, meta) in enumerate(chunk):
                    tensors = {
                        "mean": dist.mean[j].to(store_dtype).contiguous().cpu(),
                        "logvar": dist.logvar[j].to(store_dtype).contiguous().cpu(),
                        "text": text[j].to(store_dtype).contiguous().cpu(),
                    }
                    meta = {**meta, "vae": vae_id, "text_encoder": te_id}
                    encoded[key] = (meta, canonical_safetensors(save(tensors)))
    with atomic_paths(*outs) as tmps:
        with (
            open(tmps[0], "wb") as fh,
            wds.TarWriter(fh, mtime=0.0, user="lorapipe", group="lorapipe") as writer,
        ):
            for key in sorted(encoded):
                meta, blob = encoded[key]
                writer.write({"__key__": key, "latents.safetensors": blob,
                              "json": json.dumps(meta, sort_keys=True)})
        if checksum:
            with open(tmps[1], "wb") as fh:
                fh.write(checksum_line(out_tar, sha256_file(tmps[0])).encode())
    log.info("encoded %d samples from %s on %s", len(encoded), shard_tar, device)
    return len(encoded)


REQUIRED_TENSORS = ("mean", "logvar")


def load_latent_shards(paths: list[str]) -> list[dict]:
    """Read latent shards fully into memory (the common LoRA case), sorted by key.

    Each shard is checked against its checksum sidecar (when it has one) and every sample is
    decoded and checked (tensors present, shapes consistent, finite values) before anything is
    returned, so a damaged shard stops training before its first step.

    Returns:
        One dict per sample: key, mean, logvar, text (tensors), meta (dict).

    Raises:
        CorruptFileError: naming the shard (and sample). A shard that does not match its checksum,
            or has none, is deleted so that a rerun rebuilds it; one that matches its checksum
            but does not decode was written that way and is kept for inspection.
    """
    out = []
    for p in paths:
        verified = verify_file(p)
        try:
            out += _decode_latent_shard(p)
        except Exception as e:  # any decode failure means: refuse this shard
            if not verified:
                discard(p)
            raise CorruptFileError(
                f"{p}: cannot be decoded ({e}); "
                + ("it matches its checksum, so encode wrote it so: rebuild it by hand"
                   if verified else "deleted it: rerun snakemake to rebuild it")
            ) from e
    return sorted(out, key=lambda s: s["key"])


def _decode_latent_shard(path) -> list[dict]:
    import torch
    import webdataset as wds
    from safetensors.torch import load

    out = []
    key = None
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    try:
        for s in ds:
            key = s["__key__"]
            t = load(s["latents.safetensors"])
            missing = [k for k in REQUIRED_TENSORS if k not in t]
            if missing:
                raise ValueError(f"no {', '.join(missing)} tensor")
            if (
                t["mean"].shape != t["logvar"].shape
                or t["mean"].dim() != 3
                or ("text" in t and t["text"].dim() != 2)
            ):
                shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(t.items()))
                raise ValueError(f"unexpected shapes: {shapes}")
            for k, v in sorted(t.items()):
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise ValueError(f"non-finite values in {k}")
            meta = json.loads(s["json"])
            out.append({"key": key, **t, "meta": meta})
            key = None
    except Exception as e:
        if key is not None:
            raise ValueError(f"sample {key}: {e}") from e
        raise
    return out
