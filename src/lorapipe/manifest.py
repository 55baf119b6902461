"""Scan a dataset per shard: find images, hash them (sha256), decode and validate each.

A shard's manifest depends only on that shard's files. The dataset-wide manifest.jsonl and
rejected.tsv are merged views built from the shard files; no per-shard job reads them.

What a file system can hold never stops a scan: a link that points nowhere or in a circle, a name
that is not valid UTF-8, a file that cannot be read, a FIFO or device named like an image, or a
file that vanished since the plan each become a rejected record with a reason code.

The scan cache (one file per shard, outside Snakemake's outputs) keeps each record under the
file's (size, mtime_ns, ctime_ns, inode): a file rewritten in place with its size and mtime put
back (``rsync -t``, ``touch -r``, a restore from backup) has a new ctime, so it is scanned again.
:func:`rescan_token` finds such files while Snakemake plans, so that the shard's manifest is
rebuilt in that same run instead of a later stage finding bytes that no longer match.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS, ImageRejected, load_rgb, parse_colour
from .io import (
    atomic_write_text,
    remove_stale_temps,
    sha256_file,
    verify_file,
    write_checksum,
)

# Bytes per pixel of the widest uncompressed image (32-bit float RGBA): a file larger than
# max_pixels times this (plus headers) cannot be an image max_pixels allows, so it is not read.
_MAX_BYTES_PER_PIXEL = 16
_HEADER_ALLOWANCE = 1 << 20


@dataclass(frozen=True)
class ScanSettings:
    """What decides whether an image is accepted (part of the scan cache key)."""

    resolution: int
    min_size: float
    max_pixels: int
    background: str

    def key(self) -> str:
        """Digest of the settings: the scan cache's namespace."""
        blob = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of every image file under ``root`` (any extension case), sorted.

    Hidden files and folders (".name") are skipped; non-image files are ignored, not rejected.
    Links are listed whether or not they lead anywhere (the scan rejects those that do not); a
    name that is not valid UTF-8 is listed as Python's ``os`` gives it (surrogate escapes). A
    subfolder that cannot be listed (permission denied) is listed itself, so that the scan names
    it in rejected.tsv instead of its images silently going missing.
    """
    root = Path(root)
    out, errors = [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith("."):
                continue
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append((Path(dirpath) / f).relative_to(root).as_posix())
    for e in errors:
        if e.filename and Path(e.filename) != root and Path(e.filename).is_relative_to(root):
            out.append(Path(e.filename).relative_to(root).as_posix())
    return sorted(out)


def name_bytes(relpath: str) -> bytes:
    """The bytes of a relative path as the file system holds them: UTF-8 for a valid name, the
    original bytes for one that is not (which ``os`` gives as surrogate escapes)."""
    try:
        return relpath.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file system gave us
        return relpath.encode("utf-8", "surrogatepass")


def is_utf8_name(relpath: str) -> bool:
    """Whether the path is valid UTF-8 text (not a name with undecodable bytes)."""
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_name(relpath: str) -> str:
    """A path as printable UTF-8: undecodable bytes of a name shown as ``\\xNN``."""
    return name_bytes(relpath).decode("utf-8", "backslashreplace")


def shard_of(relpath: str, shards: int) -> int:
    """Stable shard index of an image: a hash of its relative path, never of its position.

    The hash is of the name's bytes, so a name that is not valid UTF-8 gets a shard too (every
    valid name keeps the shard it always had: its bytes are its UTF-8).
    """
    digest = hashlib.sha1(name_bytes(relpath)).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_files(paths: Iterable[str], shards: int, shard: int) -> list[str]:
    """The subset of ``paths`` that belongs to ``shard``."""
    return [p for p in paths if shard_of(p, shards) == shard]


def _rejected(rel: str, code: str, reason: str, **extra) -> dict:
    """A rejected record (path printable, so every view can hold it)."""
    return {"path": display_name(rel), "status": "rejected", "code": code, "reason": reason,
            **extra}  # fmt: skip


def _stat_error(root: Path, rel: str, e: OSError) -> dict:
    """The rejected record of a file that cannot be stat'ed (or opened)."""
    p = root / rel
    if e.errno == errno.ENOENT and os.path.islink(p):
        target = display_name(os.readlink(p))
        return _rejected(rel, "broken_link", f"link points nowhere (to {target})")
    if e.errno == errno.ENOENT:
        return _rejected(rel, "missing", "the file vanished after the plan was made")
    if e.errno == errno.ELOOP:
        return _rejected(rel, "link_loop", "links point in a circle")
    if e.errno in (errno.EACCES, errno.EPERM):
        return _rejected(rel, "unreadable", "permission denied")
    return _rejected(rel, "unreadable", f"cannot read: {os.strerror(e.errno or 0) or e}")


def _stat(root: Path, rel: str) -> tuple[os.stat_result | None, dict | None]:
    """``(stat, None)`` for a regular file that may be scanned, else ``(None, rejected record)``."""
    if not is_utf8_name(rel):
        return None, _rejected(
            rel, "bad_name", "file name is not valid UTF-8: rename it (convmv -f latin1 -t utf8)"
        )
    try:
        st = os.stat(root / rel)
    except OSError as e:
        return None, _stat_error(root, rel, e)
    if stat.S_ISDIR(st.st_mode):  # listed only when it could not be listed (list_images)
        try:
            os.listdir(root / rel)
            why = "a folder, named like an image"
        except OSError as e:
            return None, _rejected(
                rel, "unreadable_folder",
                f"folder cannot be listed ({os.strerror(e.errno or 0)}): its images are left out",
            )  # fmt: skip
        return None, _rejected(rel, "not_a_file", why)
    if not stat.S_ISREG(st.st_mode):
        return None, _rejected(rel, "not_a_file", "not a regular file (FIFO, device, …)")
    return st, None


def scan_image(root: Path, rel: str, settings: ScanSettings, size: int | None = None) -> dict:
    """Hash, decode and check one image; returns its manifest record (status ok or rejected).

    ``size`` (from a stat) lets a file too large for any allowed image be rejected unread.
    """
    limit = settings.max_pixels * _MAX_BYTES_PER_PIXEL + _HEADER_ALLOWANCE
    if size is not None and size > limit:
        return _rejected(
            rel, "too_large", f"file of {size} bytes: larger than any image of max_pixels="
            f"{settings.max_pixels} can be", bytes=size,
        )  # fmt: skip
    try:
        data = (root / rel).read_bytes()
    except OSError as e:
        return _stat_error(root, rel, e)
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


def _identity(st: os.stat_result) -> list[int]:
    """What the scan cache keys a file's record under (see the module docstring)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def read_scan_cache(cache_file: str | os.PathLike | None) -> dict[str, dict]:
    """Scan-cache entries by path: ``{"key", "path", "id", "record"}``; damaged lines skipped."""
    out: dict[str, dict] = {}
    if not cache_file or not Path(cache_file).exists():
        return out
    for line in Path(cache_file).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            if isinstance(entry["record"], dict) and isinstance(entry["id"], list):
                out[entry["path"]] = entry
        except (ValueError, KeyError, TypeError):
            continue  # a damaged cache line (or one of an older format) costs a re-scan
    return out


def _write_scan_cache(cache_file: str | os.PathLike, entries: Iterable[dict]) -> None:
    """Write scan-cache entries (one JSON line each, by path), atomically."""
    lines = [json.dumps(e, sort_keys=True) for e in sorted(entries, key=lambda e: e["path"])]
    atomic_write_text(cache_file, "\n".join(lines) + "\n")


def scan_shard(
    root: str | os.PathLike,
    relpaths: list[str],
    settings: ScanSettings,
    out_jsonl: str | os.PathLike,
    cache_file: str | os.PathLike | None = None,
    checksum: bool = False,
) -> dict[str, int]:
    """Write the manifest of one shard (one JSON record per image, sorted by path).

    Records of files whose (size, mtime_ns, ctime_ns, inode) and scan settings are unchanged since
    the last scan are taken from ``cache_file`` instead of re-reading and re-decoding the file.
    ``checksum`` also writes ``<out_jsonl>.sha256`` (see :mod:`lorapipe.io`).

    Returns:
        Counts: ``{"ok": n, "rejected": n, "cached": n}``.
    """
    root = Path(root)
    remove_stale_temps(out_jsonl, f"{out_jsonl}.sha256")
    cache = read_scan_cache(cache_file)
    counts = {"ok": 0, "rejected": 0, "cached": 0}
    records, new_cache = [], []
    skey = settings.key()
    for rel in sorted(relpaths):
        st, rec = _stat(root, rel)
        if st is not None:
            ident = _identity(st)
            hit = cache.get(rel)
            if hit is not None and hit.get("key") == skey and hit["id"] == ident:
                rec = hit["record"]
                counts["cached"] += 1
            else:
                rec = scan_image(root, rel, settings, size=st.st_size)
            new_cache.append({"key": skey, "path": rel, "id": ident, "record": rec})
        counts[rec["status"]] += 1
        records.append(rec)
    atomic_write_text(out_jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    if checksum:
        write_checksum(out_jsonl)
    if cache_file:
        _write_scan_cache(cache_file, new_cache)
    return counts


def rescan_token(
    root: str | os.PathLike,
    relpaths: Iterable[str],
    cache_file: str | os.PathLike,
    record: bool = True,
) -> str:
    """A Snakemake param of rule manifest that changes when a file's bytes changed while its size
    and mtime did not (which the plan's (size, mtime) stamp cannot see).

    Cheap: only a file whose ctime or inode differs from its scan-cache entry while its size and
    mtime match is hashed. Same bytes (a touch -r, a chmod, a copy with times kept): the entry is
    updated (with ``record``) and nothing restales. Other bytes: a new token, so the manifest is
    rebuilt in this run (the scan cache then misses on the new ctime). The token is kept in
    ``<cache_file>.changed`` (with ``record``), so it stays the same once the shard was rescanned.

    Returns:
        "" for a shard never found changed in place; otherwise the last such change's token.
    """
    root = Path(root)
    entries = read_scan_cache(cache_file)
    changed, dirty = [], False
    for rel in relpaths:
        e = entries.get(rel)
        sha = e["record"].get("sha256") if e else None
        if sha is None:
            continue
        try:
            ident = _identity(os.stat(root / rel))
        except (OSError, ValueError):
            continue
        if ident[:2] != e["id"][:2] or ident == e["id"]:
            continue  # changed size or mtime: the stamp restales it; or untouched
        try:
            now = sha256_file(root / rel)
        except OSError:
            continue
        if now == sha:
            e["id"], dirty = ident, True
        else:
            changed.append((rel, now))
    if dirty and record:
        _write_scan_cache(cache_file, entries.values())
    marker = Path(f"{cache_file}.changed")
    if not changed:
        return _recorded(marker)
    for rel, _ in changed:
        print(
            f"lorapipe: {root / display_name(rel)}: content changed while size and mtime stayed: "
            "its shard is scanned again",
            file=sys.stderr,
        )
    blob = "\n".join(f"{display_name(rel)}\0{sha}" for rel, sha in sorted(changed))
    token = "changed:" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    if record:
        atomic_write_text(marker, json.dumps({"token": token}) + "\n")
    return token


def _recorded(marker: Path) -> str:
    """The token a marker file holds, or "" (missing or unreadable)."""
    try:
        return str(json.loads(marker.read_text(encoding="utf-8"))["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _tsv(field: str) -> str:
    """A TSV cell: tabs and line breaks (legal in file names) escaped, one row per file."""
    return field.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _no_valid_image(records: list[dict], bad: list[dict], kept: str, dataset: str) -> ValueError:
    """The error of a dataset without one valid image: the reasons inline, and where they stay."""
    if not records:
        where = f"datasets.{dataset}.path" if dataset else "the dataset folder"
        return ValueError(f"no valid image left: no image file found (check {where})")
    codes: dict[str, int] = {}
    for r in bad:
        codes[r["code"]] = codes.get(r["code"], 0) + 1
    first = "; ".join(f"{r['path']}: {r['code']}" for r in bad[:5])
    more = f"; … {len(bad) - 5} more" if len(bad) > 5 else ""
    summary = ", ".join(f"{n} {c}" for c, n in sorted(codes.items()))
    return ValueError(
        f"no valid image left: {len(records)} file(s) found, all rejected ({summary}): "
        f"{first}{more}. Every reason is in {kept} (kept after this failure)"
    )


def merge_manifests(
    shard_jsonls: list[str],
    out_manifest: str | os.PathLike,
    out_rejected: str | os.PathLike,
    keep_copy: str | os.PathLike | None = None,
    dataset: str = "",
) -> dict[str, int]:
    """Merge shard manifests into the dataset-wide views (manifest.jsonl, rejected.tsv).

    Each shard manifest is checked against its checksum sidecar first, when it has one.
    ``keep_copy`` (a log file of the job) gets the same rejected.tsv: a failed job's outputs are
    deleted by Snakemake, its logs are not, so the reasons survive the failure they explain.

    Raises:
        ValueError: when not a single valid image is left, naming the reasons and where they are.
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
    if keep_copy:
        atomic_write_text(keep_copy, tsv)
    if not ok:
        raise _no_valid_image(records, bad, str(keep_copy or out_rejected), dataset)
    return {"ok": len(ok), "rejected": len(bad)}


def duplicates(records: Iterable[dict]) -> list[list[str]]:
    """Groups of valid images with the same bytes (same sha256), each sorted, by first path."""
    by_sha: dict[str, list[str]] = {}
    for r in records:
        if r.get("status") == "ok":
            by_sha.setdefault(r["sha256"], []).append(r["path"])
    return sorted(sorted(g) for g in by_sha.values() if len(g) > 1)
