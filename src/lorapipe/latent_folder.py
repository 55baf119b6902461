"""The encode stage of one latent folder (a dataset's latents of one model, resolution and dtype)
in one job: one process imports torch and diffusers once for every shard, not once per shard.

Each shard is still its own latent tar, with the bytes :func:`lorapipe.latents.encode_shard`
writes. Snakemake reruns the folder's job when any of its shards changed, so a shard whose inputs
did not change comes from a content-addressed cache instead of being encoded again: its key is
the image shard's sha256 (from its checksum sidecar) and everything else that decides its bytes
(the model files' sha256, a ``vae:`` override's files' sha256, dtype, batch size, caption
variants, the stage's code and library versions). An entry is a hard link of the latent tar it
was made as (no extra disk; a copy where links do not work, e.g. outputs in object storage),
checked against its own sidecar before it is used, and the folder keeps only the entries of its
current shards. So one changed image re-encodes one shard; nothing else is encoded again. torch
is imported only when some shard needs encoding.

Cache layout: ``<cache>/<shard>.<key>.tar`` and ``<shard>.<key>.tar.sha256``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from .captions import VariantSettings
from .fingerprint import cached_sha256, digest
from .io import (
    CorruptFileError,
    atomic_write_text,
    checksum_line,
    checksum_path,
    read_checksum,
    remove_stale_temps,
    sha256_file,
    verify_file,
)

log = logging.getLogger(__name__)


def model_identity(model_files: Sequence[str | os.PathLike]) -> dict[str, str]:
    """``{path relative to the files' common folder: sha256}`` of the base model files the
    stage reads (cached per file, so a 4 GB checkpoint is hashed once, not once per job)."""
    files = [Path(f) for f in model_files]
    if not files:
        return {}
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return {f.relative_to(root).as_posix(): cached_sha256(f) for f in sorted(files)}


def shard_digest(shard_tar: str | os.PathLike) -> str:
    """sha256 of an image shard: its checksum sidecar's record, else its bytes."""
    return read_checksum(shard_tar) or sha256_file(shard_tar)


def entry_name(shard_tar: str | os.PathLike, out_tar: str | os.PathLike, settings: Mapping) -> str:
    """The cache file name of one shard: ``<shard>.<key>.tar`` (``settings``: everything
    besides the image shard that decides the latent tar's bytes)."""
    key = digest({"shard_sha256": shard_digest(shard_tar), **settings})[:32]
    return f"{Path(out_tar).stem}.{key}.tar"


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src`` atomically: a hard link, or a copy where links do not work."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _take(entry: Path, out: Path) -> bool:
    """Put the cached latent tar ``entry`` at ``out`` with its sidecar; False when there is no
    intact entry (a damaged one is deleted)."""
    if not entry.is_file():
        return False
    try:
        if not verify_file(entry):  # no sidecar: not an entry this module finished
            entry.unlink(missing_ok=True)
            return False
    except CorruptFileError as e:
        log.warning("latent cache: %s", e)
        return False
    _link_or_copy(entry, out)
    os.utime(out)  # newer than its inputs: the mtime trigger must not rerun the job
    atomic_write_text(checksum_path(out), checksum_line(out, read_checksum(entry)))
    return True


def _remember(out: Path, entry: Path) -> None:
    """Keep the latent tar just written at ``out`` as cache entry ``entry`` (sidecar last)."""
    _link_or_copy(out, entry)
    atomic_write_text(checksum_path(entry), checksum_line(entry, read_checksum(out)))


def _prune(cache: Path, keep: set[str]) -> int:
    """Delete the folder's entries (and leftovers) that no current shard uses."""
    n = 0
    for f in cache.iterdir() if cache.is_dir() else ():
        name = f.name.removesuffix(".sha256")
        if f.is_file() and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                n += 1
    return n


def encode_folder(
    shard_tars: Sequence[str | os.PathLike],
    out_tars: Sequence[str | os.PathLike],
    model_path: str | os.PathLike,
    model_files: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    dtype: str = "float32",
    original_config: str | None = None,
    variants: VariantSettings | None = None,
    identity: Mapping | None = None,
    threads: int | None = None,
    vae: str | os.PathLike | None = None,
    vae_files: Sequence[str | os.PathLike] = (),
) -> dict[str, int]:
    """Write ``out_tars[i]`` (and its ``.sha256``) from ``shard_tars[i]`` for every shard of a
    latent folder: from the cache where an entry for the same inputs exists, else encoded with
    :func:`lorapipe.latents.encode_shard`.

    Args:
        model_files: the base model files the stage reads (their sha256 are part of each key).
        identity: what else decides the bytes and is not an argument here (the stage's code
            digest, library versions); part of each key.
        threads: torch intra-op threads, set only when something is encoded.
        vae: the base model's VAE override folder (`models.check_vae_folder`), encoding
            instead of the model's own VAE; ``vae_files``: its files, whose sha256 are part of
            each key (a key without an override is what it was before overrides existed).

    Returns:
        ``{"cached": n, "encoded": m, "pruned": k}``.
    """
    if len(shard_tars) != len(out_tars):
        raise ValueError(f"{len(shard_tars)} image shards but {len(out_tars)} latent shards")
    variants = variants or VariantSettings()
    cache = Path(cache_dir)
    settings = {
        "dtype": dtype,
        "batch_size": batch_size,
        "variants": asdict(variants),
        "model": model_identity(model_files),
        **dict(identity or {}),
    }
    if vae is not None:
        settings["vae"] = model_identity(vae_files)
    counts = {"cached": 0, "encoded": 0}
    keep: set[str] = set()
    for shard, out in zip(shard_tars, out_tars, strict=True):
        out = Path(out)
        remove_stale_temps(out, checksum_path(out))
        entry = cache / entry_name(shard, out, settings)
        keep.add(entry.name)
        if _take(entry, out):
            counts["cached"] += 1
            log.info("%s: unchanged, from the latent cache (%s)", out, entry.name)
            continue
        _encode(shard, model_path, out, batch_size, dtype, original_config, variants, threads,
                vae)  # fmt: skip
        _remember(out, entry)
        counts["encoded"] += 1
    counts["pruned"] = _prune(cache, keep)
    log.info("latent folder: %d shards encoded, %d from the cache, %d stale entries removed",
             counts["encoded"], counts["cached"], counts["pruned"])  # fmt: skip
    return counts


def _encode(shard, model_path, out, batch_size, dtype, original_config, variants, threads,
            vae=None):  # fmt: skip
    """One shard through :func:`lorapipe.latents.encode_shard` (torch imported here, once)."""
    import torch

    from .latents import encode_shard

    if threads:
        torch.set_num_threads(threads)
    encode_shard(
        shard, model_path, out, batch_size, dtype, checksum=True,
        original_config=original_config, variants=variants, vae=vae,
    )  # fmt: skip
