"""Precompute, per shard, the VAE latent distribution of each image and the text-encoder outputs
of each distinct caption.

Layout of a latent shard (a WebDataset tar, members in this order):

* ``__empty__.empty.safetensors``: the family's text-encoder outputs of the empty prompt (SD:
  ``text`` (L, D)), once per shard. Training uses it for caption dropout instead of loading the
  text encoder.
* ``__text__<digest>.text.safetensors``, one per distinct caption or caption variant of the
  shard (`latent_cache.text_ref`: a digest of the prompt), sorted: its outputs (``text``, and what
  else the family encodes). Template captions shared by many images are stored once.
* per sample, sorted by key, ``<key>.latents.safetensors`` holding ``mean`` and ``logvar``
  (C, H, W) (so training draws a fresh latent sample every step instead of re-using one frozen
  sample), next to ``<key>.json`` with the sample's metadata, including ``text_ref`` (its caption
  as written) and, when the dataset asks for caption variants, ``caption_variants`` (the V texts,
  variant ``k`` being ``captions.caption_variant(caption, key, k, settings)``) and
  ``text_variant_refs``.

Tensors are stored in the cache's dtype (``float32`` or ``bfloat16``; part of the cache folder
name). In the workflow each latent tar has a checksum sidecar ``<shard>.tar.sha256``.

Reading is `latent_cache`'s (re-exported here): a sample resolves its references, so training
sees ``text`` and ``text_variants`` (V, L, D) per sample as if they were stored with it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

from .captions import VariantSettings, caption_variant
from .io import (
    atomic_paths,
    canonical_safetensors,
    checksum_line,
    checksum_path,
    remove_stale_temps,
    sha256_file,
    verify_file,
)
from .latent_cache import (  # noqa: F401  (readers, re-exported for callers of this module)
    EMPTY_KEY,
    load_latent_cache,
    load_latent_shards,
    text_ref,
)

log = logging.getLogger(__name__)

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
    vae: str | None = None,
) -> int:
    """Encode one image shard into a latent shard; returns the number of samples.

    The image shard is checked against its checksum sidecar first, when it has one; ``checksum``
    also writes ``<out_tar>.sha256``, committed after the tar. ``dtype`` (float32 or bfloat16)
    is the stored dtype; the encoders run in float32 (SDXL's VAE overflows in fp16).
    ``variants`` adds ``text_variants``. ``vae``: a base model's VAE override folder
    (`models.check_vae_folder`), encoding instead of its own VAE; its digest is each sample's
    ``vae`` record.
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
    enc = _Encoders(model_path, original_config, device, getattr(torch, dtype), dtype, vae)
    by_size: dict[tuple, list] = defaultdict(list)
    for s in read_samples(shard_tar):
        by_size[tuple(s[2]["size"])].append(s)
    encoded: dict[str, tuple[dict, bytes]] = {}
    with torch.inference_mode():
        # the empty prompt (caption dropout), encoded alone as training would encode it
        empty_blob = enc.blob({k: v[0] for k, v in enc.text([""]).items()})
        for size in sorted(by_size):
            group = by_size[size]
            for i in range(0, len(group), batch_size):
                encoded.update(enc.chunk(group[i : i + batch_size], batch_size, variants))
    _write_latent_tar(outs, encoded, enc.texts, empty_blob, checksum)
    log.info("encoded %d samples (%d caption variants each, %s) from %s on %s",
             len(encoded), variants.caption_variants, dtype, shard_tar, device)
    return len(encoded)


class _Encoders:
    """The VAE and text encoder(s) of a base model, loaded once per shard, and how a chunk of
    samples becomes latent-cache entries."""

    def __init__(self, model_path, original_config, device: str, store_dtype, dtype: str,
                 vae: str | None = None):  # fmt: skip
        from . import models
        from .families import family_of

        self.family = family_of(model_path, original_config)
        self.parts = models.load_parts(
            model_path, self.family.latent_parts, original_config, vae=vae
        )
        for m in self.family.text_encoders(self.parts):
            m.to(device).eval()
        self.vae = self.parts["vae"].to(device).eval()
        self.device, self.store_dtype = device, store_dtype
        self.texts: dict[str, bytes] = {}  # text_ref -> outputs of one distinct caption
        # which VAE and text encoder(s) made a sample (single file: the whole file's digest)
        vae_digest = models.part_fingerprint(model_path, "vae", vae)[:16]
        self.meta = {"vae": vae_digest, "dtype": dtype}
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
        self._encode_new([m["caption"] for _, _, m in chunk])
        var_texts = [
            [caption_variant(m["caption"], key, k, variants) for k in range(n_var)]
            for key, _, m in chunk
        ]
        if n_var:
            flat = [t for texts in var_texts for t in texts]
            for b in range(0, len(flat), batch_size * n_var):
                self._encode_new(flat[b : b + batch_size * n_var])
        out = {}
        for j, (key, _, meta) in enumerate(chunk):
            tensors = {"mean": dist.mean[j], "logvar": dist.logvar[j]}
            meta = {**meta, **self.meta, "text_ref": text_ref(meta["caption"])}
            if n_var:
                meta["caption_variants"] = var_texts[j]
                meta["text_variant_refs"] = [text_ref(t) for t in var_texts[j]]
            out[key] = (meta, self.blob(tensors))
        return out

    def _encode_new(self, prompts: list[str]) -> None:
        """Encode the distinct prompts not kept yet, once each (a dataset of template or
        trigger-only captions runs the text encoder once, not once per image, #17). The CLIP
        text encoders are batch-invariant on CPU, so the kept bytes are those of encoding every
        prompt of the chunk."""
        new = list(dict.fromkeys(p for p in prompts if text_ref(p) not in self.texts))
        if new:
            outputs = self.text(new)
            for j, prompt in enumerate(new):
                self.texts[text_ref(prompt)] = self.blob({k: v[j] for k, v in outputs.items()})


def _write_latent_tar(outs: list, encoded: dict, texts: dict, empty_blob: bytes,
                      checksum: bool) -> None:  # fmt: skip
    """The latent tar (empty prompt first, then each distinct caption's outputs by reference,
    then samples by key) and, with ``checksum``, its sidecar: both committed atomically."""
    import webdataset as wds

    with atomic_paths(*outs) as tmps:
        with (
            open(tmps[0], "wb") as fh,
            wds.TarWriter(fh, mtime=0.0, user="lorapipe", group="lorapipe") as writer,
        ):
            writer.write({"__key__": EMPTY_KEY, "empty.safetensors": empty_blob})
            for ref in sorted(texts):
                writer.write({"__key__": ref, "text.safetensors": texts[ref]})
            for key in sorted(encoded):
                meta, blob = encoded[key]
                writer.write({"__key__": key, "latents.safetensors": blob,
                              "json": json.dumps(meta, sort_keys=True)})  # fmt: skip
        if checksum:
            with open(tmps[1], "wb") as fh:
                fh.write(checksum_line(outs[0], sha256_file(tmps[0])).encode())
