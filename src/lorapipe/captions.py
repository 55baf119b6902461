"""Captions per shard: a person's edits win, then the auto-captioner's cache, then the captioner.

Sources, in order of precedence:
1. ``captions.csv`` in the dataset folder (columns ``path,caption``) — passed in as ``overrides``;
2. a sidecar file next to the image (``img.txt``, or kohya's ``img.caption``);
3. the content-addressed cache ``<cache>/<captioner-id>/<sha[:2]>/<sha256>.txt``, keyed by the image
   bytes and the captioner's settings, so a renamed file or a captioner switched away and back costs
   nothing;
4. the captioner itself (``template`` or ``blip``); ``none`` means every image needs an edit or
   sidecar.
The cache is written only by the captioner; edits are never written anywhere but where the person
put them.

Caption variants (kohya's ``shuffle_caption`` / ``keep_tokens`` / ``caption_tag_dropout_rate``,
made ahead of time for the text-encoder cache): :func:`caption_variant` turns a comma-separated
tag caption into variant ``i`` of a sample, reproducibly from (sample key, i) alone.
:func:`merge_captions` builds the one-file review export (``captions_review.csv``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_write_text, remove_stale_temps, verify_file, write_checksum
from .manifest import read_jsonl

log = logging.getLogger(__name__)
SIDECAR_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class CaptionSettings:
    captioner: str  # template | blip | none
    template: str = "a photo of {trigger}"
    trigger: str = ""
    prefix: str = ""
    blip_model: str | None = None
    blip_model_hash: str = ""

    def captioner_id(self) -> str:
        """Cache namespace: the captioner and every setting that changes what it writes."""
        if self.captioner == "template":
            blob = json.dumps([self.template, self.trigger])
        elif self.captioner == "blip":
            blob = json.dumps([self.blip_model_hash or _folder_digest(self.blip_model)])
        else:
            blob = ""
        return f"{self.captioner}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@functools.lru_cache(maxsize=8)
def _folder_digest(folder: str | None) -> str:
    """Content hash of a model folder (every file's relative name and bytes), or ``"missing"``.

    The BLIP cache namespace when no ``blip_model_hash`` is given: without it every BLIP model
    would share one namespace and a switched model would be served the old model's captions.
    """
    if not folder or not Path(folder).is_dir():
        return "missing"
    h = hashlib.sha256()
    base = Path(folder)
    for p in sorted(x for x in base.rglob("*") if x.is_file()):
        h.update(p.relative_to(base).as_posix().encode() + b"\0")
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _read_text(path: Path) -> str:
    """A person's text file: UTF-8, with or without the BOM Windows editors add."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_overrides(csv_path: str | os.PathLike) -> dict[str, str]:
    """Read a person's caption edits (``path,caption`` rows; header required).

    Paths are relative to the dataset folder; a leading ``./`` is ignored. A UTF-8 BOM (Excel's
    "CSV UTF-8") is accepted.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        if not {"path", "caption"} <= set(fields):
            raise ValueError(f"{csv_path}: needs a header with columns 'path' and 'caption'")
        reader.fieldnames = fields
        out = {}
        for row in reader:
            rel = (row.get("path") or "").strip()
            if not rel:
                continue
            if row.get("caption") is None:
                raise ValueError(f"{csv_path}:{reader.line_num}: no caption column in this row")
            while rel.startswith("./"):
                rel = rel[2:]
            out[rel] = row["caption"].strip()
        return out


def sidecar_of(root: Path, rel: str) -> Path | None:
    stem = os.path.splitext(rel)[0]
    for ext in SIDECAR_EXTENSIONS:
        p = root / (stem + ext)
        if p.is_file():
            return p
    return None


def _cache_path(cache_dir: Path, cid: str, sha: str) -> Path:
    return cache_dir / cid / sha[:2] / f"{sha}.txt"


def caption_shard(
    root: str | os.PathLike,
    manifest_jsonl: str | os.PathLike,
    settings: CaptionSettings,
    cache_dir: str | os.PathLike,
    out_jsonl: str | os.PathLike,
    overrides: Mapping[str, str] | None = None,
    checksum: bool = False,
) -> Counter:
    """Caption every valid image of one shard; write ``{path, sha256, caption, source}`` lines.

    The manifest is checked against its checksum sidecar first, when it has one; ``checksum``
    also writes ``<out_jsonl>.sha256`` (see :mod:`lorapipe.io`).

    Returns:
        Counts per source (``edit``, ``sidecar``, ``cache``, ``template``, ``blip``) plus ``empty``.
    """
    root, cache_dir = Path(root), Path(cache_dir)
    overrides = overrides or {}
    remove_stale_temps(out_jsonl, f"{out_jsonl}.sha256")
    verify_file(manifest_jsonl)
    records = [r for r in read_jsonl(manifest_jsonl) if r["status"] == "ok"]
    cid = settings.captioner_id()
    counts: Counter = Counter()
    out: dict[str, dict] = {}
    todo = []
    for r in records:
        rel, sha = r["path"], r["sha256"]
        side = sidecar_of(root, rel)
        if rel in overrides:
            text, source = overrides[rel], "edit"
        elif side is not None:
            text, source = _read_text(side).strip(), "sidecar"
        elif settings.captioner == "none":
            raise FileNotFoundError(
                f"{root / rel}: no caption "
                "(captioner 'none' needs a sidecar .txt or a captions.csv row)"
            )
        elif _cache_path(cache_dir, cid, sha).is_file():
            text, source = _cache_path(cache_dir, cid, sha).read_text(encoding="utf-8"), "cache"
        else:
            todo.append(r)
            continue
        out[rel] = {"path": rel, "sha256": sha, "caption": text, "source": source}
    if todo:
        if settings.captioner == "template":
            texts = [settings.template.format(trigger=settings.trigger) for _ in todo]
        else:
            texts = blip_captions([root / r["path"] for r in todo], settings.blip_model)
        for r, text in zip(todo, texts, strict=True):
            atomic_write_text(_cache_path(cache_dir, cid, r["sha256"]), text)
            out[r["path"]] = {
                "path": r["path"], "sha256": r["sha256"], "caption": text,
                "source": settings.captioner,
            }
    lines = []
    for rel in sorted(out):
        rec = out[rel]
        if settings.prefix and rec["source"] not in ("edit", "sidecar"):
            rec["caption"] = f"{settings.prefix}{rec['caption']}"
        counts[rec["source"]] += 1
        if not rec["caption"]:
            counts["empty"] += 1
        lines.append(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
    atomic_write_text(out_jsonl, "".join(lines))
    if checksum:
        write_checksum(out_jsonl)
    n = len(records)
    hits = counts["cache"]
    misses = len(todo)
    log.info(
        "captions: %d images; sources %s; cache hit rate %s",
        n, dict(sorted(counts.items())),
        f"{hits / (hits + misses):.0%}" if hits + misses else "n/a",
    )
    if n and counts["empty"] > n / 2:
        log.warning("%d of %d captions are empty: check sidecar names (.txt)", counts["empty"], n)
    return counts


@dataclass(frozen=True)
class VariantSettings:
    """How the text-encoder cache makes caption variants (dataset keys of the same names)."""

    caption_variants: int = 0  # 0 = only the caption as written
    shuffle_captions: bool = False
    keep_tokens: int = 1
    tag_dropout: float = 0.0


def _unit(*parts: object) -> int:
    """A 64-bit number from a hash of ``parts``: the same on every machine and Python version."""
    blob = "\0".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def caption_variant(caption: str, key: str, index: int, settings: VariantSettings) -> str:
    """Variant ``index`` of a sample's caption, made from its comma-separated tags.

    The first ``keep_tokens`` tags stay in place; the rest are dropped (``tag_dropout``) and
    shuffled (``shuffle_captions``).

    Every draw comes from a hash of (key, index, tag position), so a variant's text is the same
    on every machine and run. A caption with no tag left after ``keep_tokens`` is returned as is.
    """
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    keep, rest = tags[: settings.keep_tokens], tags[settings.keep_tokens :]
    if not rest:
        return caption
    if settings.tag_dropout > 0:
        rest = [
            t for i, t in enumerate(rest)
            if _unit(key, index, i, "drop") / 2**64 >= settings.tag_dropout
        ]
    if settings.shuffle_captions:
        order = sorted(range(len(rest)), key=lambda i: (_unit(key, index, i, "order"), i))
        rest = [rest[i] for i in order]
    return ", ".join(keep + rest)


REVIEW_COLUMNS = ("path", "caption", "source")


def merge_captions(shard_jsonls: list[str], out_csv: str | os.PathLike) -> Counter:
    """Write every caption of a dataset into one editable CSV (``path,caption,source``), by path.

    Each shard file is checked against its checksum sidecar first, when it has one. The file
    opens in a spreadsheet or an editor; copied to ``<dataset>/captions.csv``, its captions become
    a person's edits (the ``source`` column is ignored there).

    Returns:
        Counts per source.
    """
    import io

    rows = []
    for p in shard_jsonls:
        verify_file(p)
        rows += read_jsonl(p)
    rows.sort(key=lambda r: r["path"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REVIEW_COLUMNS)
    for r in rows:
        writer.writerow([r["path"], r["caption"], r["source"]])
    atomic_write_text(out_csv, buf.getvalue())
    return Counter(r["source"] for r in rows)


def blip_captions(paths: list[Path], model_path: str | None, batch_size: int = 8) -> list[str]:
    """Caption images with a BLIP model loaded from a local folder (GPU when present)."""
    if not model_path or not Path(model_path).is_dir():
        raise FileNotFoundError(
            f"datasets.*.blip_model: BLIP model folder not found: {model_path!r} "
            "(download e.g. Salesforce/blip-image-captioning-base to a local folder)"
        )
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from .images import load_rgb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = BlipProcessor.from_pretrained(model_path, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(model_path, local_files_only=True)
    model.to(device).eval()
    out: list[str] = []
    for i in range(0, len(paths), batch_size):
        imgs = [load_rgb(p.read_bytes(), max_pixels=1 << 31) for p in paths[i : i + batch_size]]
        inputs = processor(images=imgs, return_tensors="pt").to(device)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=40)
        out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return out
