"""Reading the latent cache for training: every shard indexed, tensors decoded on demand.

Training sees a list of samples, one mapping each (``key``, ``meta``, ``mean``, ``logvar``, the
cached text-encoder outputs such as ``text``, and ``<name>_variants`` when the dataset has caption
variants). What is held in memory depends on the cache's size (`LatentCache`):

* up to ``ram_mb`` (summed tar sizes): every sample is decoded and checked before step 1 and kept
  in memory (the common LoRA case, and the fastest);
* above it: only the index is held (per sample its key, metadata and where its bytes are); a
  sample's tensors are read with ``os.pread`` from the shard when a batch needs them, and the text
  members many samples share (one per distinct caption) are kept in a small LRU. Memory is then
  independent of the dataset's size.

Shards are indexed with the standard library's ``tarfile`` (offset and size of each member; the
data is not read). webdataset's indexed reader (``wids``, a separate package) stores its index as
a pickle beside each tar, which lorapipe never loads from a user path.

Damaged shards are refused before step 1 either way: each shard is checked against its checksum
sidecar (when it has one: a full read); in memory every sample is decoded and checked (shapes,
finite values); streamed, every sample's safetensors header is checked and every text reference
resolved, and a shard without a checksum is decoded in full once (and dropped again).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from .io import CorruptFileError, discard, verify_file

log = logging.getLogger(__name__)

EMPTY_KEY = "__empty__"
TEXT_PREFIX = "__text__"  # + a digest of the caption: its text-encoder outputs, once per shard
REQUIRED_TENSORS = ("mean", "logvar")
DEFAULT_RAM_MB = 2048
# Streamed, what is kept decoded: the text members many samples share (one per distinct
# caption) and the last samples read (a batch reads mean, logvar and text of each).
TEXT_LRU_BYTES = 128 * 2**20
SAMPLE_LRU_BYTES = 64 * 2**20


def text_ref(prompt: str) -> str:
    """The member key that holds the text-encoder outputs of ``prompt`` in a latent shard."""
    import hashlib

    return TEXT_PREFIX + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:24]


class _Tar:
    """One latent shard: member offsets from the stdlib's tarfile, bytes read with ``pread``
    (positionless, so a prefetch thread and the training thread can read at once)."""

    def __init__(self, path: str):
        self.path = path
        with tarfile.open(path, "r:") as tf:
            self.members = {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, name: str, size: int | None = None) -> bytes:
        offset, full = self.members[name]
        n = full if size is None else min(size, full)
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise ValueError(f"{name}: short read ({len(data)} of {n} bytes)")
        return data

    def keys(self) -> dict[str, set[str]]:
        """``{key: {extensions}}`` as webdataset groups members (split at the first dot)."""
        out: dict[str, set[str]] = {}
        for name in self.members:
            key, _, ext = name.partition(".")
            out.setdefault(key, set()).add(ext)
        return out

    def close(self) -> None:
        os.close(self.fd)


def _decode(blob: bytes) -> dict:
    from safetensors.torch import load

    return load(blob)


def _header(tar: _Tar, name: str) -> dict:
    """The safetensors header of a member ({tensor: {dtype, shape, data_offsets}}), read alone."""
    (n,) = struct.unpack("<Q", tar.read(name, 8))
    head = json.loads(tar.read(name, 8 + n)[8:])
    head.pop("__metadata__", None)
    return head


class _LRU:
    """A thread-safe least-recently-used map of decoded members, bounded by the bytes of the
    tensors it holds (not by a count: one caption's SDXL outputs are 13x an SD-1.5 latent's)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.data, self.lock = OrderedDict(), threading.Lock()

    @staticmethod
    def _size(value: dict) -> int:
        return sum(t.numel() * t.element_size() for t in value.values())

    def get(self, key, make):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        value = make()
        with self.lock:
            if key not in self.data:
                self.data[key] = value
                self.bytes += self._size(value)
            while self.bytes > self.max_bytes and len(self.data) > 1:
                _, old = self.data.popitem(last=False)
                self.bytes -= self._size(old)
        return value


class Sample(Mapping):
    """One training sample: ``key`` and ``meta`` held, tensors from the cache on access."""

    __slots__ = ("key", "meta", "_cache", "_tar", "_tensors")

    def __init__(self, cache: LatentCache, tar: int, key: str, meta: dict):
        self.key, self.meta, self._cache, self._tar, self._tensors = key, meta, cache, tar, None

    def tensors(self) -> dict:
        if self._tensors is not None:
            return self._tensors
        return self._cache._sample_tensors(self)

    def __getitem__(self, name: str):
        if name == "key":
            return self.key
        if name == "meta":
            return self.meta
        return self.tensors()[name]

    def __iter__(self):
        yield "key"
        yield "meta"
        yield from self.tensors()

    def __len__(self) -> int:
        return 2 + len(self.tensors())

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default


class LatentCache:
    """The samples of a run's latent shards (sorted by key) and the cached empty prompt.

    Args:
        paths: latent shard tars.
        ram_mb: decode everything into memory when the shards sum to at most this many MB;
            None: always. 0: always stream.

    Raises:
        CorruptFileError: naming the shard (and sample). A shard that does not match its
            checksum, or has none, is deleted so that a rerun rebuilds it; one that matches its
            checksum but does not decode was written that way and is kept for inspection.
    """

    def __init__(self, paths: list[str], ram_mb: float | None = DEFAULT_RAM_MB):
        self.paths = [str(p) for p in paths]
        total = sum(os.path.getsize(p) for p in self.paths)
        self.size_bytes = total
        self.in_memory = ram_mb is None or total <= ram_mb * 2**20
        self._tars: list[_Tar] = []
        self._texts = _LRU(TEXT_LRU_BYTES)
        self._recent = _LRU(SAMPLE_LRU_BYTES)
        self.empty: dict | None = None
        samples: list[Sample] = []
        for p in self.paths:
            samples += self._open_checked(p)
        self.samples = sorted(samples, key=lambda s: s.key)

    def describe(self) -> str:
        mode = "in memory" if self.in_memory else "streamed from the shards"
        return (f"latent cache: {len(self.samples)} samples in {len(self.paths)} shard(s), "
                f"{self.size_bytes / 2**20:.1f} MB, {mode}")  # fmt: skip

    def close(self) -> None:
        for t in self._tars:
            t.close()
        self._tars = []

    # -- opening and checking ---------------------------------------------------------------

    def _open_checked(self, path: str) -> list[Sample]:
        verified = verify_file(path)
        try:
            tar = _Tar(path)
            self._tars.append(tar)
            samples = self._index(tar, len(self._tars) - 1, full=self.in_memory or not verified)
        except Exception as e:  # any decode failure means: refuse this shard
            if not verified:
                discard(path)
            raise CorruptFileError(
                f"{path}: cannot be decoded ({e}); "
                + ("it matches its checksum, so encode wrote it so: rebuild it by hand"
                   if verified else "deleted it: rerun snakemake to rebuild it")
            ) from e
        return samples

    def _index(self, tar: _Tar, idx: int, full: bool) -> list[Sample]:
        """The samples of one shard, checked (decoded in full when ``full``)."""
        keys = tar.keys()
        if EMPTY_KEY in keys:
            self._check_empty(tar)
        out = []
        for key in sorted(k for k in keys if not k.startswith("__")):
            try:
                meta = json.loads(tar.read(f"{key}.json"))
                s = Sample(self, idx, key, meta)
                if full:
                    tensors = self._load(s)
                    _check_tensors(tensors)
                    if self.in_memory:
                        s._tensors = tensors
                else:
                    self._check_header(tar, s)
            except Exception as e:
                raise ValueError(f"sample {key}: {e}") from e
            out.append(s)
        return out

    def _check_empty(self, tar: _Tar) -> None:
        import torch

        empty = _decode(tar.read(f"{EMPTY_KEY}.empty.safetensors"))
        text = empty.get("text")
        if text is None or text.dim() != 2 or not torch.isfinite(text).all():
            shape = None if text is None else tuple(text.shape)
            raise ValueError(f"bad empty-prompt tensor {shape}")
        if self.empty is None:
            self.empty = empty
        elif empty.keys() != self.empty.keys() or any(
            v.shape != self.empty[k].shape or not torch.equal(v, self.empty[k])
            for k, v in empty.items()
        ):
            raise CorruptFileError(
                f"{tar.path}: its empty-prompt encoding differs from {self.paths[0]}'s "
                "(latent shards of different text encoders or dtypes)"
            )

    def _check_header(self, tar: _Tar, s: Sample) -> None:
        head = _header(tar, f"{s.key}.latents.safetensors")
        missing = [k for k in REQUIRED_TENSORS if k not in head]
        if missing:
            raise ValueError(f"no {', '.join(missing)} tensor")
        mean, logvar = head["mean"]["shape"], head["logvar"]["shape"]
        if mean != logvar or len(mean) != 3:
            raise ValueError(f"unexpected shapes: mean {tuple(mean)}, logvar {tuple(logvar)}")
        for ref in _refs(s.meta):
            if f"{ref}.text.safetensors" not in tar.members:
                raise ValueError(f"its text member {ref} is missing")

    # -- reading ----------------------------------------------------------------------------

    def _sample_tensors(self, s: Sample) -> dict:
        return self._recent.get((s._tar, s.key), lambda: self._load(s))

    def _text(self, tar_idx: int, ref: str) -> dict:
        tar = self._tars[tar_idx]
        return self._texts.get((tar_idx, ref), lambda: _decode(tar.read(f"{ref}.text.safetensors")))

    def _load(self, s: Sample) -> dict:
        """A sample's tensors: its latent distribution and its captions' cached outputs."""
        import torch

        t = _decode(self._tars[s._tar].read(f"{s.key}.latents.safetensors"))
        ref = s.meta.get("text_ref")
        if ref is not None:
            t.update(self._text(s._tar, ref))
        refs = s.meta.get("text_variant_refs")
        if refs:
            variants = [self._text(s._tar, r) for r in refs]
            for name in variants[0]:
                t[f"{name}_variants"] = torch.stack([v[name] for v in variants])
        return t


def _refs(meta: dict) -> list[str]:
    return ([meta["text_ref"]] if "text_ref" in meta else []) + list(
        meta.get("text_variant_refs") or ()
    )


def _check_tensors(t: dict) -> None:
    """Tensors present, shapes consistent, values finite (a decoded sample)."""
    import torch

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
    ):  # fmt: skip
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(t.items()))
        raise ValueError(f"unexpected shapes: {shapes}")
    for k, v in sorted(t.items()):
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"non-finite values in {k}")


def load_latent_cache(paths: list[str], ram_mb: float | None = None):
    """``(samples, empty_text)``: the samples of `LatentCache` (in memory unless ``ram_mb`` says
    otherwise) and the empty prompt's ``text`` output (L, D), or None for shards written before
    it was stored."""
    cache = LatentCache(paths, ram_mb)
    return cache.samples, (cache.empty or {}).get("text")


def load_latent_shards(paths: list[str]) -> list:
    """The samples of :func:`load_latent_cache` (for callers that need no empty prompt)."""
    return load_latent_cache(paths)[0]


def shard_sizes(paths: list[str]) -> int:
    """Bytes of the shards (what `LatentCache` compares with its RAM budget)."""
    return sum(Path(p).stat().st_size for p in paths)
