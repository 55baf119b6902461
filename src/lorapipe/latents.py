"""Precompute, per shard, the VAE latent distribution and the text-encoder output of each caption.

Layout of a latent shard (a WebDataset tar, members in this order):

* ``__empty__.empty.safetensors``: ``text`` (L, D), the text-encoder output of the empty prompt
  (tokenised as training does: padded to the tokenizer's max length), once per shard. Training
  uses it for caption dropout instead of loading the text encoder.
* per sample, sorted by key, ``<key>.latents.safetensors`` holding ``mean`` and ``logvar``
  (C, H, W) (so training draws a fresh latent sample every step instead of re-using one frozen
  sample), ``text`` (L, D) (the caption as written) and, when the dataset asks for caption variants,
  ``text_variants`` (V, L, D): variant ``k`` is the encoding of
  ``captions.caption_variant(caption, key, k, settings)`` (tags shuffled/dropped, reproducibly);
  next to ``<key>.json`` with the sample's metadata (plus ``caption_variants``, the V texts).

Tensors are stored in the cache's dtype (``float32`` or ``bfloat16``; part of the cache folder
name). In the workflow each latent tar has a checksum sidecar ``<shard>.tar.sha256``; training
verifies it and decodes every sample before the first step, so a damaged shard is refused, never
trained on.

Reading: ``load_latent_cache(paths) -> (samples, empty_text or None)``;
``load_latent_shards(paths)`` returns the samples only. A training step that wants a variant
picks ``text_variants[k]`` with ``k`` drawn from the sample's own generator (``text`` when the
sample has no ``text_variants``), and ``empty_text`` for caption dropout.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

from .captions import VariantSettings, caption_variant
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


EMPTY_KEY = "__empty__"
DTYPES = ("float32", "bfloat16")


def encode_shard(
    shard_tar: str | os.PathLike,
    model_path: str | os.PathLike,
    out_tar: str | os.PathLike,
    batch_size: int = 8,
    dtype: str = "float32",
    checksum: bool = False,
    original_config: str | None = None,
    variants: VariantSettings | None = None,
) -> int:
    """Encode one image shard into a latent shard; returns the number of samples.

    The image shard is checked against its checksum sidecar first, when it has one; ``checksum``
    also writes ``<out_tar>.sha256``, committed after the tar. ``dtype`` (float32 or bfloat16)
    is the stored dtype; the encoders run in float32. ``variants`` adds ``text_variants``.
    """
    import torch

    from .shards import read_samples

    if dtype not in DTYPES:
        raise ValueError(f"latent dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    variants = variants or VariantSettings()
    if variants.caption_variants and not (variants.shuffle_captions or variants.tag_dropout):
        log.warning("caption_variants=%d without shuffle_captions or tag_dropout: "
                    "every variant is the caption as written", variants.caption_variants)
    outs = [out_tar] + ([checksum_path(out_tar)] if checksum else [])
    remove_stale_temps(*outs)
    verify_file(shard_tar)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = _Encoders(model_path, original_config, device, getattr(torch, dtype), dtype)
    by_size: dict[tuple, list] = defaultdict(list)
    for s in read_samples(shard_tar):
        by_size[tuple(s[2]["size"])].append(s)
    encoded: dict[str, tuple[dict, bytes]] = {}
    with torch.inference_mode():
        # the empty prompt (caption dropout), encoded alone as training would encode it
        empty_blob = enc.blob({"text": enc.text([""])[0]})
        for size in sorted(by_size):
            group = by_size[size]
            for i in range(0, len(group), batch_size):
                encoded.update(enc.chunk(group[i : i + batch_size], batch_size, variants))
    _write_latent_tar(outs, encoded, empty_blob, checksum)
    log.info("encoded %d samples (%d caption variants each, %s) from %s on %s",
             len(encoded), variants.caption_variants, dtype, shard_tar, device)
    return len(encoded)


class _Encoders:
    """The VAE and text encoder(s) of a base model, loaded once per shard, and how a chunk of
    samples becomes latent-cache entries."""

    def __init__(self, model_path, original_config, device: str, store_dtype, dtype: str):
        from . import models
        from .families import family_of

        self.family = family_of(model_path, original_config)
        self.parts = models.load_parts(model_path, self.family.latent_parts, original_config)
        for m in self.family.text_encoders(self.parts):
            m.to(device).eval()
        self.vae = self.parts["vae"].to(device).eval()
        self.device, self.store_dtype = device, store_dtype
        # which VAE and text encoder(s) made a sample (single file: the whole file's digest)
        self.meta = {"vae": models.part_fingerprint(model_path, "vae")[:16], "dtype": dtype}
        for part in self.family.text_parts:
            if part in self.family.weight_parts:
                self.meta[part] = models.part_fingerprint(model_path, part)[:16]

    def text(self, prompts: list[str]):
        return self.family.encode_prompts(self.parts, prompts, self.device)

    def blob(self, tensors: dict) -> bytes:
        from safetensors.torch import save

        stored = {k: v.to(self.store_dtype).contiguous().cpu() for k, v in tensors.items()}
        return canonical_safetensors(save(stored))

    def chunk(self, chunk: list, batch_size: int, variants: VariantSettings) -> dict:
        """``{key: (meta, safetensors bytes)}`` of samples ``chunk`` (one bucket size)."""
        import numpy as np
        import torch

        n_var = variants.caption_variants
        pixels = np.stack([np.asarray(img, dtype=np.float32) for _, img, _ in chunk])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device) / 127.5 - 1.0
        dist = self.vae.encode(x).latent_dist
        text = self.text([m["caption"] for _, _, m in chunk])
        var_texts = [
            [caption_variant(m["caption"], key, k, variants) for k in range(n_var)]
            for key, _, m in chunk
        ]
        if n_var:
            flat = [t for texts in var_texts for t in texts]
            var = torch.cat([self.text(flat[b : b + batch_size * n_var])
                             for b in range(0, len(flat), batch_size * n_var)])  # fmt: skip
            var = var.reshape(len(chunk), n_var, *var.shape[1:])
        out = {}
        for j, (key, _, meta) in enumerate(chunk):
            tensors = {"mean": dist.mean[j], "logvar": dist.logvar[j], "text": text[j]}
            meta = {**meta, **self.meta}
            if n_var:
                tensors["text_variants"] = var[j]
                meta["caption_variants"] = var_texts[j]
            out[key] = (meta, self.blob(tensors))
        return out


def _write_latent_tar(outs: list, encoded: dict, empty_blob: bytes, checksum: bool) -> None:
    """The latent tar (empty prompt first, then samples by key) and, with ``checksum``, its
    sidecar: both committed atomically, the tar first."""
    import webdataset as wds

    with atomic_paths(*outs) as tmps:
        with (
            open(tmps[0], "wb") as fh,
            wds.TarWriter(fh, mtime=0.0, user="lorapipe", group="lorapipe") as writer,
        ):
            writer.write({"__key__": EMPTY_KEY, "empty.safetensors": empty_blob})
            for key in sorted(encoded):
                meta, blob = encoded[key]
                writer.write({"__key__": key, "latents.safetensors": blob,
                              "json": json.dumps(meta, sort_keys=True)})  # fmt: skip
        if checksum:
            with open(tmps[1], "wb") as fh:
                fh.write(checksum_line(outs[0], sha256_file(tmps[0])).encode())


REQUIRED_TENSORS = ("mean", "logvar")


def load_latent_shards(paths: list[str]) -> list[dict]:
    """The samples of :func:`load_latent_cache` (kept for callers that need no empty prompt)."""
    return load_latent_cache(paths)[0]


def load_latent_cache(paths: list[str]):
    """Read latent shards fully into memory (the common LoRA case).

    Each shard is checked against its checksum sidecar (when it has one) and every sample is
    decoded and checked (tensors present, shapes consistent, finite values) before anything is
    returned, so a damaged shard stops training before its first step.

    Returns:
        ``(samples, empty_text)``: one dict per sample, sorted by key (key, mean, logvar, text,
        text_variants when the cache has variants (tensors), meta (dict)); and the empty prompt's
        text-encoder output (L, D), or None for shards written before it was stored.

    Raises:
        CorruptFileError: naming the shard (and sample). A shard that does not match its checksum,
            or has none, is deleted so that a rerun rebuilds it; one that matches its checksum
            but does not decode was written that way and is kept for inspection. Shards whose
            empty prompts differ (made by different text encoders) are refused too.
    """
    import torch

    out = []
    empty = None
    for p in paths:
        verified = verify_file(p)
        try:
            samples, shard_empty = _decode_latent_shard(p)
        except Exception as e:  # any decode failure means: refuse this shard
            if not verified:
                discard(p)
            raise CorruptFileError(
                f"{p}: cannot be decoded ({e}); "
                + ("it matches its checksum, so encode wrote it so: rebuild it by hand"
                   if verified else "deleted it: rerun snakemake to rebuild it")
            ) from e
        if shard_empty is not None:
            if empty is None:
                empty = shard_empty
            elif empty.shape != shard_empty.shape or not torch.equal(empty, shard_empty):
                raise CorruptFileError(
                    f"{p}: its empty-prompt encoding differs from {paths[0]}'s "
                    "(latent shards of different text encoders or dtypes)"
                )
        out += samples
    return sorted(out, key=lambda s: s["key"]), empty


def _decode_latent_shard(path) -> tuple[list[dict], object]:
    import torch
    import webdataset as wds
    from safetensors.torch import load

    out = []
    empty = None
    key = None
    # nodesplitter=None: every rank of a data-parallel run reads every shard in full (the ranks
    # split batches, not shards); webdataset's default refuses to read under RANK/WORLD_SIZE
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=None)
    try:
        for s in ds:
            key = s["__key__"]
            if key == EMPTY_KEY:
                empty = load(s["empty.safetensors"])["text"]
                if empty.dim() != 2 or not torch.isfinite(empty).all():
                    raise ValueError(f"bad empty-prompt tensor {tuple(empty.shape)}")
                key = None
                continue
            t = load(s["latents.safetensors"])
            missing = [k for k in REQUIRED_TENSORS if k not in t]
            if missing:
                raise ValueError(f"no {', '.join(missing)} tensor")
            if (
                t["mean"].shape != t["logvar"].shape
                or t["mean"].dim() != 3
                or ("text" in t and t["text"].dim() != 2)
                or ("text_variants" in t and (
                    t["text_variants"].dim() != 3
                    or ("text" in t and t["text_variants"].shape[1:] != t["text"].shape)))
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
    return out, empty
