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

    def spy(root_, rel, settings, **kw):
        seen.append(rel)
        return real(root_, rel, settings, **kw)

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


# --- what a file system can hold (issue 16) ---------------------------------------------------


def test_shard_of_a_name_that_is_not_utf8_hashes_its_bytes():
    """os.walk gives undecodable bytes as surrogate escapes; shard_of used to raise on them."""
    rel = os.fsdecode(b"sub/caf\xe9.png")
    want = int.from_bytes(hashlib.sha1(b"sub/caf\xe9.png").digest()[:8], "big") % 16
    assert shard_of(rel, 16) == want
    assert shard_of("sub/Ünïcode café.PNG", 16) == 8  # valid names keep their shard


def _hazards(root: Path) -> dict[str, str]:
    """Write one file of each kind a folder can hold that is not a usable image; returns
    {listed name: expected reason code}. (Each kind is one generator case.)"""
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    os.symlink("nowhere.png", root / "dangling.png")
    made["dangling.png"] = "broken_link"
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    made["loop_a.png"] = made["loop_b.png"] = "link_loop"
    bad = os.path.join(os.fsencode(root), b"caf\xe9.png")
    with open(bad, "wb") as fh:
        fh.write(write_image(root / "tmp.png"))
    os.unlink(root / "tmp.png")
    made[os.fsdecode(b"caf\xe9.png")] = "bad_name"
    os.mkfifo(root / "pipe.png")
    made["pipe.png"] = "not_a_file"
    (root / "empty.jpg").write_bytes(b"")
    made["empty.jpg"] = "empty"
    (root / "notes.jpg").write_text("not an image\n")
    made["notes.jpg"] = "not_an_image"
    with open(root / "huge.tif", "wb") as fh:  # sparse: no disk used, never read
        fh.truncate(10**7 * 16 + 2**21)
    made["huge.tif"] = "too_large"
    write_image(root / "gone.png")
    made["gone.png"] = "missing"  # listed, then deleted before the scan
    return made


def test_every_file_system_hazard_becomes_a_rejected_record(tmp_path):
    """Links that point nowhere or in a circle, non-UTF-8 names, FIFOs, vanished and huge files:
    the scan never raises (a FIFO would have blocked it), each gets a reason code, and the
    merged rejected.tsv holds a printable row for each."""
    root = tmp_path / "data"
    expected = _hazards(root)
    write_image(root / "good.png")
    listed = list_images(root)
    assert set(expected) | {"good.png"} == set(listed)
    os.unlink(root / "gone.png")
    out = tmp_path / "s.jsonl"
    counts = scan_shard(root, listed, SETTINGS, out, tmp_path / "cache.jsonl")
    assert counts == {"ok": 1, "rejected": len(expected), "cached": 0}
    recs = {r["path"]: r for r in read_jsonl(out)}
    got = {p: r["code"] for p, r in recs.items() if r["status"] == "rejected"}
    shown = {manifest.display_name(p): c for p, c in expected.items()}
    assert got == shown
    assert recs["dangling.png"]["reason"] == "link points nowhere (to nowhere.png)"
    merge_manifests([str(out)], tmp_path / "m.jsonl", tmp_path / "r.tsv")
    rows = (tmp_path / "r.tsv").read_text(encoding="utf-8").splitlines()
    assert "caf\\xe9.png\tbad_name\tfile name is not valid UTF-8: rename it" in "\n".join(rows)
    assert len(rows) == 1 + len(expected)


def test_unreadable_file_is_rejected_not_fatal(tmp_path, monkeypatch):
    """Permission denied (simulated: the tests may run as root) is a rejected record."""
    root = tmp_path / "data"
    write_image(root / "locked.png")
    real = Path.read_bytes

    def denied(self):
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    counts, recs = scan(root, tmp_path)
    assert counts["rejected"] == 1
    assert (recs["locked.png"]["code"], recs["locked.png"]["reason"]) == (
        "unreadable", "permission denied")


def write_bmp(path: Path, colour) -> bytes:
    """A 40x40 BMP: every colour gives the same file size (uncompressed)."""
    return write_image(path, colour=colour, fmt="BMP")


def rewrite_in_place(path: Path, data: bytes) -> None:
    """New bytes, same size and mtime (what rsync -t, touch -r or a restore leave)."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_file_rewritten_in_place_is_found_while_planning_and_rescanned(tmp_path):
    """Same size and mtime, other bytes: the old scan cache served the old sha256 forever (the
    shard stage then failed every rerun). rescan_token changes, the rescan reads the new bytes,
    and the token then stays put, so the next plan is a no-op."""
    root = tmp_path / "data"
    write_bmp(root / "a.bmp", (10, 10, 10))
    write_bmp(root / "b.bmp", (20, 20, 20))
    cache, out = tmp_path / "cache.jsonl", tmp_path / "s.jsonl"
    rels = list_images(root)
    scan_shard(root, rels, SETTINGS, out, cache)
    assert manifest.rescan_token(root, rels, cache) == ""
    new = write_bmp(tmp_path / "other.bmp", (200, 0, 0))
    rewrite_in_place(root / "b.bmp", new)
    token = manifest.rescan_token(root, rels, cache)
    assert token.startswith("changed:")
    counts = scan_shard(root, rels, SETTINGS, out, cache)  # the rebuilt manifest
    assert counts == {"ok": 2, "rejected": 0, "cached": 1}
    sha = {r["path"]: r["sha256"] for r in read_jsonl(out)}
    assert sha["b.bmp"] == hashlib.sha256(new).hexdigest()
    assert manifest.rescan_token(root, rels, cache) == token  # stable: nothing restales again
    rewrite_in_place(root / "b.bmp", write_bmp(tmp_path / "x.bmp", (20, 20, 20)))
    assert manifest.rescan_token(root, rels, cache) not in ("", token)  # changed back: again


def test_same_bytes_put_back_restales_nothing_and_is_hashed_once(tmp_path, monkeypatch):
    """A touch -r or a copy with times kept changes the ctime only: verified once, remembered."""
    root = tmp_path / "data"
    data = write_bmp(root / "a.bmp", (10, 10, 10))
    cache = tmp_path / "cache.jsonl"
    scan_shard(root, ["a.bmp"], SETTINGS, tmp_path / "s.jsonl", cache)
    rewrite_in_place(root / "a.bmp", data)
    assert manifest.rescan_token(root, ["a.bmp"], cache, record=False) == ""
    assert manifest.rescan_token(root, ["a.bmp"], cache) == ""

    def no_hash(*args):
        raise AssertionError("hashed again")

    monkeypatch.setattr(manifest, "sha256_file", no_hash)
    assert manifest.rescan_token(root, ["a.bmp"], cache) == ""


def test_all_rejected_keeps_the_reasons_where_the_failure_leaves_them(tmp_path):
    """Snakemake deletes a failed job's outputs (rejected.tsv with them) but keeps its logs:
    the copy in the log survives, the message names it and gives the first reasons inline."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.png").write_text("nope")
    out = tmp_path / "s.jsonl"
    scan_shard(root, list_images(root), SETTINGS, out)
    copy = tmp_path / "logs" / "demo.rejected.tsv"
    with pytest.raises(ValueError) as e:
        merge_manifests([str(out)], tmp_path / "m.jsonl", tmp_path / "r.tsv", keep_copy=copy,
                        dataset="demo")  # fmt: skip
    msg = str(e.value)
    assert "2 file(s) found, all rejected (1 empty, 1 not_an_image): a.jpg: empty; b.png: " in msg
    assert f"Every reason is in {copy} (kept after this failure)" in msg
    (tmp_path / "r.tsv").unlink()  # what Snakemake does to the failed job's outputs
    assert "a.jpg\tempty\t" in copy.read_text()


def test_no_image_at_all_names_the_dataset_setting(tmp_path):
    out = tmp_path / "s.jsonl"
    out.write_text("")
    with pytest.raises(ValueError, match=r"no image file found \(check datasets\.demo\.path\)"):
        merge_manifests([str(out)], tmp_path / "m.jsonl", tmp_path / "r.tsv", dataset="demo")


def test_duplicates_are_grouped():
    recs = [{"path": p, "sha256": s, "status": "ok"} for p, s in
            (("b.png", "1"), ("a.png", "1"), ("c.png", "2"), ("d.png", "1"))]  # fmt: skip
    recs.append({"path": "e.png", "sha256": "2", "status": "rejected"})
    assert manifest.duplicates(recs) == [["a.png", "b.png", "d.png"]]


def test_a_subfolder_that_cannot_be_listed_is_named_not_skipped(tmp_path, monkeypatch):
    """os.walk skipped an unreadable folder without a word: its images silently went missing.
    (Permission is simulated: the tests may run as root.)"""
    root = tmp_path / "data"
    write_image(root / "ok.png")
    write_image(root / "private" / "a.png")
    real_scandir, real_listdir = os.scandir, os.listdir
    locked = str(root / "private")

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    def listdir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    assert list_images(root) == ["ok.png", "private"]
    counts, recs = scan(root, tmp_path)
    assert counts["rejected"] == 1
    assert recs["private"]["code"] == "unreadable_folder"
    assert "Permission denied" in recs["private"]["reason"]
