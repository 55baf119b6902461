"""Precompute, per shard, the VAE latent distribution and the text-encoder output of each caption.

Stored per sample as ``<key>.latents.safetensors`` holding ``mean`` and ``logvar`` (so training
draws a fresh latent sample every step instead of re-using one frozen sample) and ``text`` (the
last hidden state for the caption), next to ``<key>.json`` with the sample's metadata.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

from .io import atomic_path, canonical_safetensors

log = logging.getLogger(__name__)


def encode_shard(
    shard_tar: str | os.PathLike,
    model_path: str | os.PathLike,
    out_tar: str | os.PathLike,
    batch_size: int = 8,
    dtype: str = "float32",
) -> int:
    """Encode one image shard into a latent shard; returns the number of samples."""
    import numpy as np
    import torch
    import webdataset as wds
    from safetensors.torch import save

    from .models import load_parts, part_fingerprint
    from .shards import read_samples

    device = "cuda" if torch.cuda.is_available() else "cpu"
    store_dtype = getattr(torch, dtype)
    parts = load_parts(model_path, ("vae", "text_encoder", "tokenizer"))
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
                    encoded[key] = ({**meta, "vae": vae_id, "text_encoder": te_id}, canonical_safetensors(save(tensors)))
    with atomic_path(out_tar) as tmp, open(tmp, "wb") as fh:
        writer = wds.TarWriter(fh, mtime=0.0, user="lorapipe", group="lorapipe")
        for key in sorted(encoded):
            meta, blob = encoded[key]
            writer.write(
                {"__key__": key, "latents.safetensors": blob, "json": json.dumps(meta, sort_keys=True)}
            )
        writer.close()
    log.info("encoded %d samples from %s on %s", len(encoded), shard_tar, device)
    return len(encoded)


def load_latent_shards(paths: list[str]) -> list[dict]:
    """Read latent shards fully into memory (the common LoRA case), sorted by key.

    Returns:
        One dict per sample: key, mean, logvar, text (tensors), meta (dict).
    """
    import webdataset as wds
    from safetensors.torch import load

    out = []
    for p in paths:
        ds = wds.WebDataset(str(p), shardshuffle=False, empty_check=False)
        for s in ds:
            t = load(s["latents.safetensors"])
            out.append({"key": s["__key__"], **t, "meta": json.loads(s["json"])})
    return sorted(out, key=lambda s: s["key"])
