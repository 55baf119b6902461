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
import difflib
import functools
import hashlib
import io
import json
import logging
import os
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping
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


def read_override_rows(csv_path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """A person's caption edits as ``(line, path, caption)`` rows (``path,caption`` header
    required; other columns, such as the review file's ``source``, are ignored).

    Paths are relative to the dataset folder; a leading ``./`` is ignored, and rows without a
    path are skipped. A UTF-8 BOM (Excel's "CSV UTF-8") is accepted.

    Raises:
        ValueError: naming the file (and the line): not UTF-8, no header, a row with fewer or
            more cells than the header (an unquoted comma in a caption), or two different
            captions for one image.
    """
    try:
        text = Path(csv_path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}): save it as "
            "\"CSV UTF-8\""
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip() for f in reader.fieldnames or []]
    if not {"path", "caption"} <= set(fields):
        raise ValueError(f"{csv_path}: needs a header with columns 'path' and 'caption'")
    reader.fieldnames = fields
    rows: list[tuple[int, str, str]] = []
    first: dict[str, tuple[int, str]] = {}
    for row in reader:
        line = reader.line_num
        rel = (row.get("path") or "").strip()
        if not rel:
            continue
        if row.get("caption") is None:
            raise ValueError(f"{csv_path}:{line}: no caption column in this row")
        if row.get(None):
            raise ValueError(
                f"{csv_path}:{line}: more cells than the header ({', '.join(fields)}): a caption "
                'with a comma must be in double quotes ("red, blue")'
            )
        while rel.startswith("./"):
            rel = rel[2:]
        caption = row["caption"].strip()
        seen = first.setdefault(rel, (line, caption))
        if seen[1] != caption:
            raise ValueError(
                f"{csv_path}:{line}: {rel} already has another caption on line {seen[0]} "
                "(one row per image)"
            )
        rows.append((line, rel, caption))
    return rows


def read_overrides(csv_path: str | os.PathLike) -> dict[str, str]:
    """A person's caption edits by image path (see :func:`read_override_rows`)."""
    return {rel: caption for _line, rel, caption in read_override_rows(csv_path)}


def closest_image(rel: str, images: list[str], lowered: Mapping[str, str]) -> str | None:
    """The image a captions.csv path that matches none most likely meant, or None.

    Tried in order: a difference of case only; Windows separators, a leading ``/`` or another
    Unicode normal form (macOS writes names decomposed); then a close spelling.
    """
    present = set(images)
    fixed = rel.replace("\\", "/").lstrip("/")
    for cand in (fixed, unicodedata.normalize("NFC", fixed), unicodedata.normalize("NFD", fixed)):
        if cand in present and cand != rel:
            return cand
        if cand.lower() in lowered:
            return lowered[cand.lower()]
    if len(images) <= 20000:
        close = difflib.get_close_matches(fixed, images, n=1, cutoff=0.8)
        if close:
            return close[0]
    return None


def unmatched_overrides(
    csv_path: str | os.PathLike, images: list[str]
) -> list[tuple[int, str, str | None]]:
    """Rows of captions.csv that match no image: ``(line, path, closest image or None)``."""
    present = set(images)
    lowered: dict[str, str] = {}
    for p in images:
        lowered.setdefault(p.lower(), p)
    out = []
    for line, rel, _caption in read_override_rows(csv_path):
        if rel not in present:
            out.append((line, rel, closest_image(rel, images, lowered)))
    return out


def _stderr(msg: str) -> None:
    """A warning while Snakemake plans: on stderr, marked as lorapipe's."""
    print(f"lorapipe: {msg}", file=sys.stderr)


def report_unmatched(
    root: str | os.PathLike,
    out_tsv: str | os.PathLike,
    write: bool = True,
    limit: int = 20,
    warn: Callable[[str], None] = _stderr,
) -> list[tuple[int, str, str | None]]:
    """Warn about each captions.csv row of a dataset that matches no image, and list them all in
    ``out_tsv`` (``line, path, closest``; removed once every row matches), so an edit is never
    silently lost. Run while Snakemake plans (warnings on stderr); it costs one folder listing.

    Returns:
        The unmatched rows.
    """
    from .manifest import list_images

    csv_path = Path(root) / "captions.csv"
    rows = unmatched_overrides(csv_path, list_images(root)) if csv_path.is_file() else []
    for line, rel, near in rows[:limit]:
        hint = f" (did you mean {near!r}?)" if near else ""
        warn(f"{csv_path}:{line}: {rel!r} matches no image{hint}: its caption is unused")
    if len(rows) > limit:
        warn(f"{csv_path}: {len(rows) - limit} more rows match no image")
    if rows:
        warn(f"{csv_path}: every row that matches no image is listed in {out_tsv}")
    if not write:
        return rows
    if rows:
        body = "".join(
            f"{line}\t{_cell(rel)}\t{_cell(near or '')}\n" for line, rel, near in rows
        )
        text = "line\tpath\tclosest\n" + body
        p = Path(out_tsv)
        if not p.is_file() or p.read_text(encoding="utf-8", errors="replace") != text:
            atomic_write_text(p, text)
    else:
        Path(out_tsv).unlink(missing_ok=True)
    return rows


def _cell(field: str) -> str:
    """A TSV cell: tabs and line breaks escaped."""
    return field.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


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
    dataset: str = "",
) -> Counter:
    """Caption every valid image of one shard; write ``{path, sha256, caption, source}`` lines.

    The manifest is checked against its checksum sidecar first, when it has one; ``checksum``
    also writes ``<out_jsonl>.sha256`` (see :mod:`lorapipe.io`). ``dataset`` names the dataset
    in messages (``datasets.<dataset>.blip_model: …``). An edit of an image the scan rejected is
    logged as unused.

    Returns:
        Counts per source (``edit``, ``sidecar``, ``cache``, ``template``, ``blip``) plus ``empty``.
    """
    root, cache_dir = Path(root), Path(cache_dir)
    overrides = overrides or {}
    remove_stale_temps(out_jsonl, f"{out_jsonl}.sha256")
    verify_file(manifest_jsonl)
    manifest = read_jsonl(manifest_jsonl)
    records = [r for r in manifest if r["status"] == "ok"]
    for r in manifest:
        if r["status"] != "ok" and r["path"] in overrides:
            log.warning("captions.csv row %r: the image is rejected (%s: %s): its caption is "
                        "unused", r["path"], r["code"], r["reason"])  # fmt: skip
    cid = settings.captioner_id()
    out: dict[str, dict] = {}
    todo = []
    for r in records:
        found = _known_caption(root, r, settings, cache_dir, cid, overrides, dataset)
        if found is None:
            todo.append(r)
        else:
            out[r["path"]] = {"path": r["path"], "sha256": r["sha256"], "caption": found[0],
                              "source": found[1]}  # fmt: skip
    for r, text in zip(todo, _generate(root, todo, settings, dataset), strict=True):
        atomic_write_text(_cache_path(cache_dir, cid, r["sha256"]), text)
        out[r["path"]] = {
            "path": r["path"], "sha256": r["sha256"], "caption": text,
            "source": settings.captioner,
        }  # fmt: skip
    counts: Counter = Counter()
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
    _log_counts(counts, len(records), len(todo))
    return counts


def _known_caption(root, r, settings, cache_dir, cid, overrides, dataset):
    """``(text, source)`` of an image from an edit, sidecar or the cache; None: generate it."""
    rel, sha = r["path"], r["sha256"]
    if rel in overrides:
        return overrides[rel], "edit"
    side = sidecar_of(root, rel)
    if side is not None:
        return _read_text(side).strip(), "sidecar"
    if settings.captioner == "none":
        raise FileNotFoundError(
            f"{root / rel}: no caption (datasets.{dataset or '<dataset>'}.captioner 'none' needs "
            "a sidecar .txt or a captions.csv row)"
        )
    cached = _cache_path(cache_dir, cid, sha)
    if cached.is_file():
        return cached.read_text(encoding="utf-8"), "cache"
    return None


def _generate(root: Path, todo: list[dict], settings: CaptionSettings, dataset: str) -> list[str]:
    """The captioner's captions of ``todo`` (template or BLIP)."""
    if not todo:
        return []
    key = f"datasets.{dataset or '<dataset>'}"
    if settings.captioner == "template":
        try:
            text = settings.template.format(trigger=settings.trigger)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{key}.caption_template: {settings.template!r} cannot be filled in "
                f"({type(e).__name__}: {e}); the only placeholder is {{trigger}}"
            ) from None
        return [text for _ in todo]
    return blip_captions([root / r["path"] for r in todo], settings.blip_model, key=key)


def _log_counts(counts: Counter, n: int, misses: int) -> None:
    """The caption job's summary: sources, cache hit rate, and a warning for mostly empty."""
    hits = counts["cache"]
    log.info(
        "captions: %d images; sources %s; cache hit rate %s",
        n, dict(sorted(counts.items())),
        f"{hits / (hits + misses):.0%}" if hits + misses else "n/a",
    )  # fmt: skip
    if n and counts["empty"] > n / 2:
        log.warning("%d of %d captions are empty: check sidecar names (.txt)", counts["empty"], n)


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


def blip_captions(
    paths: list[Path], model_path: str | None, batch_size: int = 8, key: str = "datasets.*"
) -> list[str]:
    """Caption images with a BLIP model loaded from a local folder (GPU when present).

    ``key`` (``datasets.<name>``) names the setting in the error for a missing folder.
    """
    if not model_path or not Path(model_path).is_dir():
        raise FileNotFoundError(
            f"{key}.blip_model: BLIP model folder not found: {model_path!r} "
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
