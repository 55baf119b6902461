"""Unit tests for lorapipe.shards: reproducible WebDataset tars, bucketing, the jsonl index."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from lorapipe.images import make_buckets
from lorapipe.manifest import ScanSettings, list_images, read_jsonl, scan_shard
from lorapipe.shards import ShardSettings, read_samples, sample_key, write_shard

# an error path must close the tar stream itself, not leave it to the garbage collector
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

RES, STEP = 64, 16
SHARD = ShardSettings(resolution=RES, bucket_step=STEP, buckets=True, max_pixels=10**7,
                      background="#ffffff")
SCAN = ScanSettings(resolution=RES, min_size=0.5, max_pixels=10**7, background="#ffffff")
SIZES = {"square.png": (96, 96), "wide.png": (128, 64), "tall.jpg": (60, 120),
         "sub/ünï code.png": (100, 80)}


def write_image(path: Path, size, colour=(200, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.paste((20, 20, 220), (0, 0, size[0] // 2, size[1] // 2))
    img.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


@pytest.fixture()
def dataset(tmp_path):
    """Four images of different aspect ratios (plus a broken one), scanned and captioned."""
    root = tmp_path / "data"
    for i, (rel, size) in enumerate(SIZES.items()):
        write_image(root / rel, size, colour=(200, 40 * i, 40))
    (root / "broken.png").write_bytes(b"")
    manifest = tmp_path / "manifest.jsonl"
    scan_shard(root, list_images(root), SCAN, manifest)
    captions = tmp_path / "captions.jsonl"
    recs = [r for r in read_jsonl(manifest) if r["status"] == "ok"]
    captions.write_text("".join(
        json.dumps({"path": r["path"], "sha256": r["sha256"], "caption": f"caption of {r['path']}",
                    "source": "template"}) + "\n" for r in recs
    ))
    return root, manifest, captions


def write(dataset, out_dir: Path, settings: ShardSettings = SHARD):
    root, manifest, captions = dataset
    n = write_shard(root, manifest, captions, settings, out_dir / "0.tar", out_dir / "0.jsonl")
    return n, out_dir / "0.tar", read_jsonl(out_dir / "0.jsonl")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tar_is_byte_identical_when_written_twice(dataset, tmp_path):
    """Same inputs → same tar bytes and index bytes, whatever the folder or manifest order."""
    n1, tar1, _ = write(dataset, tmp_path / "a")
    root, manifest, captions = dataset
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(reversed(manifest.read_text().splitlines(keepends=True))))
    n2, tar2, _ = write((root, shuffled, captions), tmp_path / "b")
    assert n1 == n2 == len(SIZES)
    assert sha(tar1) == sha(tar2)
    assert (tmp_path / "a/0.jsonl").read_bytes() == (tmp_path / "b/0.jsonl").read_bytes()


def test_members_are_rgb_and_json_per_sample_with_fixed_metadata(dataset, tmp_path):
    """Each sample is <key>.json + <key>.rgb, in key order, with no owner/time leaking in."""
    _, tar, index = write(dataset, tmp_path / "out")
    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        names = [m.name for m in members]
        keys = sorted(sample_key(p) for p in SIZES)
        assert names == [f"{k}.{ext}" for k in keys for ext in ("json", "rgb")]
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "lorapipe")}
        pixels = {m.name[:-4]: tf.extractfile(m).read() for m in members if m.name.endswith(".rgb")}
    assert [x["key"] for x in index] == keys
    for x in index:
        assert hashlib.sha256(pixels[x["key"]]).hexdigest() == x["rgb_sha256"]
        w, h = x["size"]
        assert len(pixels[x["key"]]) == w * h * 3


def test_read_samples_roundtrip_and_index_fields(dataset, tmp_path):
    """read_samples yields every sample; its meta and image agree with the index line."""
    _, tar, index = write(dataset, tmp_path / "out")
    manifest = {r["path"]: r for r in read_jsonl(dataset[1])}
    samples = list(read_samples(tar))
    assert [k for k, _, _ in samples] == [x["key"] for x in index]
    for (key, img, meta), line in zip(samples, index, strict=True):
        assert {"key", "path", "sha256", "caption", "size", "crop", "rgb_sha256"} <= set(line)
        assert key == line["key"] == sample_key(meta["path"])
        assert meta == {k: v for k, v in line.items() if k not in ("key", "rgb_sha256")}
        assert meta["sha256"] == manifest[meta["path"]]["sha256"]
        assert meta["caption"] == f"caption of {meta['path']}"
        assert meta["original_size"] == list(SIZES[meta["path"]])
        assert img.mode == "RGB" and list(img.size) == meta["size"]
    assert "broken.png" not in {x["path"] for x in index}


def test_sizes_are_buckets_chosen_by_aspect_ratio(dataset, tmp_path):
    """Sizes are buckets (step multiples, area ≤ res²); 2:1 goes landscape, 1:2 portrait."""
    _, _, index = write(dataset, tmp_path / "out")
    buckets = {(b.width, b.height) for b in make_buckets(RES, STEP)}
    size = {x["path"]: tuple(x["size"]) for x in index}
    for w, h in size.values():
        assert (w, h) in buckets
        assert w % STEP == 0 and h % STEP == 0 and w * h <= RES * RES
    assert size["square.png"] == (RES, RES)
    assert size["wide.png"][0] > size["wide.png"][1]
    assert size["tall.jpg"][1] > size["tall.jpg"][0]
    crop = {x["path"]: x["crop"] for x in index}
    assert crop["square.png"] == [0, 0]
    assert crop["wide.png"][1] == 0 and crop["wide.png"][0] > 0  # cut on the long side


def test_without_buckets_every_sample_is_square(dataset, tmp_path):
    """buckets=False: every sample is resolution x resolution."""
    flat = ShardSettings(resolution=48, bucket_step=STEP, buckets=False, max_pixels=10**7,
                         background="#ffffff")
    _, tar, index = write(dataset, tmp_path / "out", flat)
    assert {tuple(x["size"]) for x in index} == {(48, 48)}
    assert {img.size for _, img, _ in read_samples(tar)} == {(48, 48)}


def test_stored_pixels_are_the_resized_image(dataset, tmp_path):
    """The stored image shows the source: top-left quadrant blue, bottom-right the base colour."""
    _, tar, _ = write(dataset, tmp_path / "out")
    for _, img, meta in read_samples(tar):
        w, h = img.size
        r, g, b = img.getpixel((w // 8, h // 8))
        assert b > 150 and r < 80, meta["path"]
        r, g, b = img.getpixel((w - 1 - w // 8, h - 1 - h // 8))
        assert r > 150 and b < 100, meta["path"]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_no_temp_files_after_success(dataset, tmp_path):
    """Only the tar and its index are left in the output folder."""
    write(dataset, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.jsonl", "0.tar"]


def test_image_changed_after_scan_is_a_clear_error(dataset, tmp_path):
    """An image edited after scanning: error naming the file; no tar, no index, no temp file."""
    root = dataset[0]
    write_image(root / "wide.png", (128, 64), colour=(1, 2, 3))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"wide\.png: changed since it was scanned"):
        write(dataset, out)
    assert not (out / "0.tar").exists() and not (out / "0.jsonl").exists()
    assert no_temp_files(out)


def test_missing_caption_is_a_clear_error(dataset, tmp_path):
    """A valid image without a caption line: error naming the image, nothing written."""
    root, manifest, captions = dataset
    lines = [x for x in captions.read_text().splitlines() if "tall.jpg" not in x]
    captions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no caption for tall\.jpg"):
        write(dataset, out)
    assert not (out / "0.tar").exists()
    assert no_temp_files(out)


def test_failed_rewrite_keeps_the_previous_tar(dataset, tmp_path):
    """A failing rewrite leaves the earlier, complete tar untouched (atomic replace)."""
    out = tmp_path / "out"
    _, tar, _ = write(dataset, out)
    before = sha(tar)
    write_image(dataset[0] / "square.png", (96, 96), colour=(9, 9, 9))
    with pytest.raises(RuntimeError):
        write(dataset, out)
    assert sha(tar) == before
    assert no_temp_files(out)


def test_stored_bytes_do_not_depend_on_source_format_metadata(tmp_path):
    """The stored image carries pixels only: same pixels with different EXIF/text → same sample."""
    shas = []
    for i, extra in enumerate(({}, {"pnginfo": _text_chunk("made by a camera")})):
        root = tmp_path / f"d{i}"
        root.mkdir()
        Image.new("RGB", (64, 64), (5, 100, 200)).save(root / "x.png", **extra)
        manifest, captions = tmp_path / f"m{i}.jsonl", tmp_path / f"c{i}.jsonl"
        scan_shard(root, ["x.png"], SCAN, manifest)
        rec = read_jsonl(manifest)[0]
        captions.write_text(json.dumps({"path": "x.png", "caption": "c", "sha256": rec["sha256"],
                                        "source": "edit"}) + "\n")
        write_shard(root, manifest, captions, SHARD, tmp_path / f"o{i}.tar", tmp_path / f"o{i}.j")
        shas.append(read_jsonl(tmp_path / f"o{i}.j")[0]["rgb_sha256"])
    assert shas[0] == shas[1]


def _text_chunk(text: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)
    return info


def test_sample_key_is_stable_and_safe():
    """Keys are pinned, unique per path and free of dots and slashes (WebDataset splits on '.')."""
    assert sample_key("sub/a.b.png") == hashlib.sha1(b"sub/a.b.png").hexdigest()[:20]
    assert sample_key("a.png") != sample_key("b.png")
    assert "." not in sample_key("x.y.z.png") and "/" not in sample_key("d/x.png")


def test_index_is_valid_utf8_jsonl(dataset, tmp_path):
    """The index keeps non-ASCII paths readable and has one JSON object per line."""
    write(dataset, tmp_path / "out")
    text = (tmp_path / "out" / "0.jsonl").read_bytes().decode("utf-8")
    assert "ünï code" in text
    assert len(text.splitlines()) == len(SIZES)
    assert all(json.loads(line)["path"] for line in text.splitlines())


def test_stored_rgb_is_the_resized_image_and_old_png_shards_still_read(dataset, tmp_path):
    """The .rgb member is exactly resize_crop's output; a shard with .png members reads too."""
    import webdataset as wds

    from lorapipe.images import load_rgb, nearest_bucket, resize_crop

    root = dataset[0]
    _, tar, _ = write(dataset, tmp_path / "out")
    with tarfile.open(tar) as tf:
        raw = {m.name[:-4]: tf.extractfile(m).read() for m in tf if m.name.endswith(".rgb")}
    samples = list(read_samples(tar))
    for key, img, meta in samples:
        src = load_rgb((root / meta["path"]).read_bytes(), max_pixels=10**7)
        want, _ = resize_crop(src, nearest_bucket(*src.size, make_buckets(RES, STEP)))
        assert raw[key] == img.tobytes() == want.tobytes()
    old = tmp_path / "old.tar"
    with open(old, "wb") as fh, wds.TarWriter(fh) as w:
        for key, img, meta in samples:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            w.write({"__key__": key, "png": buf.getvalue(), "json": json.dumps(meta)})
    assert [(k, i.tobytes(), m) for k, i, m in read_samples(old)] == [
        (k, i.tobytes(), m) for k, i, m in samples
    ]
    bad = tmp_path / "bad.tar"
    key, img, meta = samples[0]
    with open(bad, "wb") as fh, wds.TarWriter(fh) as w:
        w.write({"__key__": key, "rgb": img.tobytes()[:-3], "json": json.dumps(meta)})
    with pytest.raises(ValueError, match=rf"bad\.tar: sample {key}: .* bytes of pixels"):
        list(read_samples(bad))


def test_shard_tar_is_the_bytes_webdataset_writes_and_needs_no_torch(dataset, tmp_path):
    """#17: shards are written without webdataset (its package imports torch); the tar is the
    one webdataset.TarWriter writes from the same samples, byte for byte."""
    import subprocess
    import sys

    import webdataset as wds

    from lorapipe.shards import TAR_MTIME

    _, tar, _ = write(dataset, tmp_path / "a")
    with tarfile.open(tar) as t:
        samples: dict[str, dict] = {}
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = t.extractfile(m).read()
    samples[next(iter(samples))]["json"] = samples[next(iter(samples))]["json"].decode()  # a str
    ref = tmp_path / "ref.tar"
    with open(ref, "wb") as fh, wds.TarWriter(fh, mtime=TAR_MTIME, user="lorapipe",
                                              group="lorapipe") as w:  # fmt: skip
        for s in samples.values():
            w.write(s)
    assert ref.read_bytes() == tar.read_bytes()
    root, manifest, captions = dataset
    out = tmp_path / "b"
    out.mkdir()
    prog = (  # a shard job's work, in a fresh interpreter
        "import sys; from lorapipe.shards import ShardSettings, write_shard; "
        f"write_shard({str(root)!r}, {str(manifest)!r}, {str(captions)!r}, ShardSettings("
        "resolution=64, bucket_step=16, buckets=True, max_pixels=10**7, background='#ffffff'), "
        f"{str(out / '0.tar')!r}, {str(out / '0.jsonl')!r}); "
        "assert not {'torch', 'webdataset'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", prog], check=True)
    assert (out / "0.tar").read_bytes() == tar.read_bytes()
