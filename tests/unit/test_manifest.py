"""Unit tests for lorapipe.manifest: listing, shard assignment, scanning, cache, merged views."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

import lorapipe.manifest as manifest
from lorapipe.manifest import (
    ScanSettings,
    list_images,
    merge_manifests,
    read_jsonl,
    scan_shard,
    shard_files,
    shard_of,
)

SETTINGS = ScanSettings(resolution=64, min_size=0.5, max_pixels=10**7, background="#ffffff")


def write_image(path: Path, size=(40, 40), colour=(200, 30, 30), fmt: str = "PNG", **kw) -> bytes:
    """Write an image file (creating folders) and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def scan(root: Path, tmp_path: Path, settings: ScanSettings = SETTINGS, name: str = "0"):
    """Scan every image under ``root`` as one shard; returns (counts, records by path)."""
    out = tmp_path / "out" / f"{name}.jsonl"
    counts = scan_shard(root, list_images(root), settings, out, tmp_path / "out" / "cache.jsonl")
    return counts, {r["path"]: r for r in read_jsonl(out)}


# --- listing and shard assignment -------------------------------------------------------------


def test_list_images_any_case_recursive_ignores_other_and_hidden_files(tmp_path):
    """Any-case image extensions in subfolders are found; .txt/.json and hidden entries are not."""
    for rel in ("a.JPG", "b.Png", "sub/deeper/c.jpeg", "sub/d.webp", "e.TIFF"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    for rel in ("a.txt", "meta.json", "captions.csv", ".hidden.png", ".cache/f.png", "noext"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert list_images(tmp_path) == sorted(
        ["a.JPG", "b.Png", "e.TIFF", "sub/d.webp", "sub/deeper/c.jpeg"]
    )


def test_shard_of_golden_values():
    """Shard assignment is a fixed function of the path (pinned: a change restales all)."""
    assert shard_of("photos/cat 01.jpg", 16) == 5
    assert shard_of("photos/cat 01.jpg", 7) == 6
    assert shard_of("img_000.png", 16) == 0
    assert shard_of("sub/Ünïcode café.PNG", 16) == 8


def test_adding_files_does_not_move_others_between_shards():
    """Each file's shard depends only on its own path, not on which other files exist."""
    before = [f"img_{i:03d}.png" for i in range(50)]
    after = sorted(before + [f"new/{i}.jpg" for i in range(30)])
    assignment = {p: shard_of(p, 8) for p in before}
    for shard in range(8):
        mine = set(shard_files(after, 8, shard))
        assert {p for p in before if p in mine} == {p for p, s in assignment.items() if s == shard}
    assert len({shard_of(p, 8) for p in after}) == 8  # every shard used


# --- scanning ---------------------------------------------------------------------------------


def test_scan_shard_records_hash_size_and_rejections(tmp_path):
    """ok records carry sha256 (as hashlib), bytes, displayed size; bad files get a reason code."""
    root = tmp_path / "data"
    big = write_image(root / "big.png", size=(80, 48))
    small = write_image(root / "small.png", size=(80, 20))  # short side 20 < 0.5 * 64
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("hello\n")
    counts, recs = scan(root, tmp_path)
    assert counts == {"ok": 1, "rejected": 3, "cached": 0}
    ok = recs["big.png"]
    assert ok["status"] == "ok"
    assert ok["sha256"] == hashlib.sha256(big).hexdigest()
    assert (ok["bytes"], ok["width"], ok["height"]) == (len(big), 80, 48)
    assert recs["small.png"]["code"] == "too_small"
    assert "80x20" in recs["small.png"]["reason"]
    assert recs["small.png"]["sha256"] == hashlib.sha256(small).hexdigest()
    assert recs["empty.jpg"]["code"] == "empty"
    assert recs["text.jpg"]["code"] == "not_an_image"
    lines = (tmp_path / "out" / "0.jsonl").read_text().splitlines()
    assert [json.loads(x)["path"] for x in lines] == sorted(recs)


def test_too_small_uses_displayed_size(tmp_path):
    """An EXIF-rotated JPEG is judged and recorded by its displayed (rotated) size."""
    exif = Image.Exif()
    exif[0x0112] = 6
    write_image(tmp_path / "d" / "rot.jpg", size=(64, 40), fmt="JPEG", exif=exif.tobytes())
    _, recs = scan(tmp_path / "d", tmp_path)
    assert (recs["rot.jpg"]["width"], recs["rot.jpg"]["height"]) == (40, 64)
    strict = ScanSettings(resolution=100, min_size=0.5, max_pixels=10**7, background="#ffffff")
    _, recs = scan(tmp_path / "d", tmp_path, strict, name="strict")
    assert recs["rot.jpg"]["code"] == "too_small"
    assert "40x64" in recs["rot.jpg"]["reason"]


def test_unicode_and_spaces_in_names(tmp_path):
    """Unicode and spaces in folder and file names scan like any other name."""
    root = tmp_path / "data set"
    data = write_image(root / "été 2024" / "Ünïcode café ✓.png")
    counts, recs = scan(root, tmp_path)
    assert counts["ok"] == 1
    assert recs["été 2024/Ünïcode café ✓.png"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_demo_dataset_rejects_only_the_truncated_file(demo_images, tmp_path):
    """The fixture dataset: 16 ok images, the truncated JPEG rejected as truncated."""
    counts, recs = scan(demo_images, tmp_path)
    assert (counts["ok"], counts["rejected"]) == (16, 1)
    assert recs["broken/truncated.jpg"]["code"] == "truncated"


# --- the (size, mtime) cache ------------------------------------------------------------------


def test_second_scan_is_served_from_cache_without_reading(tmp_path, monkeypatch):
    """Unchanged files are taken from the cache: scan_image is never called, output identical."""
    root = tmp_path / "data"
    for i in range(3):
        write_image(root / f"{i}.png", colour=(i * 50, 0, 0))
    (root / "bad.jpg").write_bytes(b"")
    first, _ = scan(root, tmp_path)
    out = tmp_path / "out" / "0.jsonl"
    before = out.read_bytes()

    def spy(*args, **kwargs):
        raise AssertionError(f"scan_image called for a cached file: {args[1]}")

    monkeypatch.setattr(manifest, "scan_image", spy)
    second, _ = scan(root, tmp_path)
    assert second == {"ok": 3, "rejected": 1, "cached": 4}
    assert out.read_bytes() == before


def test_changed_file_is_rescanned(tmp_path, monkeypatch):
    """A file whose bytes (and so size/mtime) changed is re-read; the others stay cached."""
    root = tmp_path / "data"
    write_image(root / "a.png", colour=(10, 10, 10))
    write_image(root / "b.png", colour=(20, 20, 20))
    _, recs = scan(root, tmp_path)
    old_sha = recs["b.png"]["sha256"]
    new = write_image(root / "b.png", size=(50, 40), colour=(30, 200, 30))
    st = (root / "b.png").stat()
    os.utime(root / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    seen = []
    real = manifest.scan_image

    def spy(root_, rel, settings):
        seen.append(rel)
        return real(root_, rel, settings)

    monkeypatch.setattr(manifest, "scan_image", spy)
    counts, recs = scan(root, tmp_path)
    assert seen == ["b.png"]
    assert counts == {"ok": 2, "rejected": 0, "cached": 1}
    assert recs["b.png"]["sha256"] == hashlib.sha256(new).hexdigest() != old_sha
    assert recs["b.png"]["width"] == 50


def test_changed_settings_invalidate_the_cache(tmp_path):
    """The cache is keyed by the scan settings: a new resolution re-judges every file."""
    root = tmp_path / "data"
    write_image(root / "a.png", size=(40, 40))
    assert scan(root, tmp_path)[1]["a.png"]["status"] == "ok"
    strict = ScanSettings(resolution=128, min_size=0.5, max_pixels=10**7, background="#ffffff")
    counts, recs = scan(root, tmp_path, strict)
    assert counts["cached"] == 0
    assert recs["a.png"]["code"] == "too_small"


def test_damaged_cache_lines_only_cost_a_rescan(tmp_path):
    """Garbage in the cache file is ignored, not fatal."""
    root = tmp_path / "data"
    write_image(root / "a.png")
    scan(root, tmp_path)
    cache = tmp_path / "out" / "cache.jsonl"
    cache.write_text("not json\n{\"stamp\": 1}\n" + cache.read_text()[:10] + "\n")
    counts, _ = scan(root, tmp_path)
    assert counts == {"ok": 1, "rejected": 0, "cached": 0}


# --- merged views -----------------------------------------------------------------------------


def test_merge_manifests_writes_views(tmp_path):
    """manifest.jsonl holds every record sorted by path; rejected.tsv lists the bad ones."""
    root = tmp_path / "data"
    write_image(root / "z.png")
    write_image(root / "a.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    (root / "empty.jpg").write_bytes(b"")
    paths = list_images(root)
    shard_jsonls = []
    for shard in range(2):
        out = tmp_path / f"s{shard}.jsonl"
        scan_shard(root, shard_files(paths, 2, shard), SETTINGS, out)
        shard_jsonls.append(str(out))
    counts = merge_manifests(shard_jsonls, tmp_path / "manifest.jsonl", tmp_path / "rejected.tsv")
    assert counts == {"ok": 2, "rejected": 2}
    merged = read_jsonl(tmp_path / "manifest.jsonl")
    assert [r["path"] for r in merged] == sorted(paths)
    rows = (tmp_path / "rejected.tsv").read_text().splitlines()
    assert rows[0] == "path\tcode\treason"
    body = dict((r.split("\t")[0], r.split("\t")) for r in rows[1:])
    assert set(body) == {"broken.png", "empty.jpg"}
    assert body["empty.jpg"][1] == "empty"
    assert all(len(cols) == 3 and cols[2] for cols in body.values())


def test_rejected_tsv_stays_one_row_per_file(tmp_path):
    """Tabs/newlines in a file name or reason cannot split or add rows of rejected.tsv."""
    rec = {"path": "odd\tname\n.png", "sha256": "0", "bytes": 0, "status": "rejected",
           "code": "corrupt", "reason": "line one\nline\ttwo"}
    ok = {"path": "fine.png", "sha256": "1", "bytes": 1, "status": "ok", "width": 1, "height": 1}
    shard = tmp_path / "s.jsonl"
    shard.write_text(json.dumps(rec) + "\n" + json.dumps(ok) + "\n")
    merge_manifests([str(shard)], tmp_path / "m.jsonl", tmp_path / "r.tsv")
    rows = (tmp_path / "r.tsv").read_text().splitlines()
    assert len(rows) == 2
    assert rows[1] == "odd\\tname\\n.png\tcorrupt\tline one\\nline\\ttwo"


def test_merge_without_any_valid_image_raises_clearly(tmp_path):
    """All files rejected: ValueError saying so and pointing at rejected.tsv, which is written."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.png").write_text("nope")
    out = tmp_path / "s.jsonl"
    scan_shard(root, list_images(root), SETTINGS, out)
    with pytest.raises(ValueError, match=r"no valid image.*2 file\(s\).*rejected\.tsv"):
        merge_manifests([str(out)], tmp_path / "manifest.jsonl", tmp_path / "rejected.tsv")
    assert "a.jpg\tempty\t" in (tmp_path / "rejected.tsv").read_text()
