"""Scan a dataset per shard: find images, hash them (sha256), decode and validate each.

A shard's manifest depends only on that shard's files. The dataset-wide manifest.jsonl and
rejected.tsv are merged views built from the shard files; no per-shard job reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS, ImageRejected, load_rgb, parse_colour
from .io import atomic_write_text, remove_stale_temps, verify_file, write_checksum


@dataclass(frozen=True)
class ScanSettings:
    """What decides whether an image is accepted (part of the scan cache key)."""

    resolution: int
    min_size: float
    max_pixels: int
    background: str

    def key(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of every image file under ``root`` (any extension case), sorted.

    Hidden files and folders (".name") are skipped; non-image files are ignored, not rejected.
    """
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith("."):
                continue
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(out)


def shard_of(relpath: str, shards: int) -> int:
    """Stable shard index of an image: a hash of its relative path, never of its position."""
    digest = hashlib.sha1(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_files(paths: Iterable[str], shards: int, shard: int) -> list[str]:
    """The subset of ``paths`` that belongs to ``shard``."""
    return [p for p in paths if shard_of(p, shards) == shard]


def scan_image(root: Path, rel: str, settings: ScanSettings) -> dict:
    """Hash, decode and check one image; returns its manifest record (status ok or rejected)."""
    data = (root / rel).read_bytes()
    rec = {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    try:
        img = load_rgb(
            data, max_pixels=settings.max_pixels, background=parse_colour(settings.background)
        )
        w, h = img.size
        floor = settings.min_size * settings.resolution
        if min(w, h) < floor:
            raise ImageRejected(
                "too_small", f"{w}x{h}: short side below {floor:g} px (min_size x resolution)"
            )
    except ImageRejected as e:
        return {**rec, "status": "rejected", "code": e.code, "reason": e.message}
    return {**rec, "status": "ok", "width": w, "height": h}


def scan_shard(
    root: str | os.PathLike,
    relpaths: list[str],
    settings: ScanSettings,
    out_jsonl: str | os.PathLike,
    cache_file: str | os.PathLike | None = None,
    checksum: bool = False,
) -> dict[str, int]:
    """Write the manifest of one shard (one JSON record per image, sorted by path).

    Records of files whose (size, mtime_ns) and scan settings are unchanged since the last scan
    are taken from ``cache_file`` instead of re-reading and re-decoding the file. ``checksum``
    also writes ``<out_jsonl>.sha256`` (see :mod:`lorapipe.io`).

    Returns:
        Counts: ``{"ok": n, "rejected": n, "cached": n}``.
    """
    root = Path(root)
    remove_stale_temps(out_jsonl, f"{out_jsonl}.sha256")
    cache: dict[str, dict] = {}
    if cache_file and Path(cache_file).exists():
        for line in Path(cache_file).read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                cache[entry["stamp"]] = entry["record"]
            except (ValueError, KeyError):
                continue  # a damaged cache line costs a re-scan, nothing else
    counts = {"ok": 0, "rejected": 0, "cached": 0}
    records, new_cache = [], []
    skey = settings.key()
    for rel in sorted(relpaths):
        st = (root / rel).stat()
        stamp = f"{skey}:{rel}:{st.st_size}:{st.st_mtime_ns}"
        rec = cache.get(stamp)
        if rec is None:
            rec = scan_image(root, rel, settings)
        else:
            counts["cached"] += 1
        counts[rec["status"]] += 1
        records.append(rec)
        new_cache.append(json.dumps({"stamp": stamp, "record": rec}, sort_keys=True))
    atomic_write_text(out_jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    if checksum:
        write_checksum(out_jsonl)
    if cache_file:
        atomic_write_text(cache_file, "\n".join(new_cache) + "\n")
    return counts


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _tsv(field: str) -> str:
    """A TSV cell: tabs and line breaks (legal in file names) escaped, one row per file."""
    return field.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def merge_manifests(
    shard_jsonls: list[str], out_manifest: str | os.PathLike, out_rejected: str | os.PathLike
) -> dict[str, int]:
    """Merge shard manifests into the dataset-wide views (manifest.jsonl, rejected.tsv).

    Each shard manifest is checked against its checksum sidecar first, when it has one.

    Raises:
        ValueError: when not a single valid image is left.
        CorruptFileError: when a shard manifest was damaged (it is deleted, to be rebuilt).
    """
    for p in shard_jsonls:
        verify_file(p)
    records = sorted((r for p in shard_jsonls for r in read_jsonl(p)), key=lambda r: r["path"])
    ok = [r for r in records if r["status"] == "ok"]
    bad = [r for r in records if r["status"] != "ok"]
    atomic_write_text(out_manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    tsv = "path\tcode\treason\n" + "".join(
        f"{_tsv(r['path'])}\t{r['code']}\t{_tsv(r['reason'])}\n" for r in bad
    )
    atomic_write_text(out_rejected, tsv)
    if not ok:
        raise ValueError(
            f"no valid image left: {len(records)} file(s) found, all rejected "
            f"(reasons in {out_rejected})"
        )
    return {"ok": len(ok), "rejected": len(bad)}
