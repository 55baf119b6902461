"""Bad inputs through the real workflow (issue 16): what a folder can hold never stops the plan
or the run, the reasons survive a failure, a file rewritten in place is rescanned, an unmatched
caption edit is reported, and a config file with a duplicate key stops the plan naming it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image
from wf import planned_jobs, small_config, snakemake, write_config

pytestmark = pytest.mark.slow


def bmp(colour) -> bytes:
    """A 40x40 BMP: the same file size for every colour (uncompressed)."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, format="BMP")
    return buf.getvalue()


def hazards(root: Path) -> dict[str, str]:
    """One file of each kind that is not a usable image; returns {name in rejected.tsv: code}."""
    root.mkdir(parents=True)
    os.symlink("nowhere.png", root / "dangling.png")
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    with open(os.path.join(os.fsencode(root), b"caf\xe9.bmp"), "wb") as fh:
        fh.write(bmp((1, 2, 3)))
    os.mkfifo(root / "pipe.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image\n")
    (root / "cut.png").write_bytes(bmp((9, 9, 9))[:200])
    with open(root / "huge.tif", "wb") as fh:  # sparse, never read
        fh.truncate(178956970 * 16 + 2**21)
    return {
        "dangling.png": "broken_link", "loop_a.png": "link_loop", "loop_b.png": "link_loop",
        "caf\\xe9.bmp": "bad_name", "pipe.png": "not_a_file", "empty.jpg": "empty",
        "notes.jpg": "not_an_image", "cut.png": "truncated", "huge.tif": "too_large",
    }  # fmt: skip


def test_bad_inputs_through_the_workflow(tmp_path):
    from lorapipe.manifest import shard_of

    work = tmp_path
    data = work / "data" / "mine"
    data.mkdir(parents=True)
    for i in range(6):
        (data / f"img_{i}.bmp").write_bytes(bmp((40 * i, 0, 0)))
    os.symlink("gone.bmp", data / "dangling.bmp")
    with open(os.path.join(os.fsencode(data), b"bad\xff.bmp"), "wb") as fh:
        fh.write(bmp((0, 0, 99)))
    (data / "captions.csv").write_text("path,caption\nIMG_0.bmp,a red thing\nimg_2.bmp,two\n")
    expected = hazards(work / "data" / "bad")
    cfg = small_config()
    cfg["datasets"]["bad"] = {**cfg["datasets"]["mine"], "path": "data/bad", "shards": 2}
    write_config(work / "cfg.yaml", cfg)
    shards = [f"results/mine/shards/{i:05d}.tar" for i in range(3)]

    # 1. links, a non-UTF-8 name and an unmatched edit: the plan and the run go on
    out = snakemake(work, *shards, "results/mine/rejected.tsv")
    assert "captions.csv:2: 'IMG_0.bmp' matches no image (did you mean 'img_0.bmp'?)" in out.stderr
    assert (work / "results/mine/captions_unmatched.tsv").read_text().splitlines()[1] == (
        "2\tIMG_0.bmp\timg_0.bmp"
    )
    rejected = (work / "results/mine/rejected.tsv").read_text(encoding="utf-8")
    assert "dangling.bmp\tbroken_link\t" in rejected and "bad\\xff.bmp\tbad_name\t" in rejected

    # 2. an image rewritten in place (same size and mtime) and its sidecar edited: this failed
    #    every rerun with "changed since it was scanned; rerun the workflow"
    img = data / "img_1.bmp"
    st = img.stat()
    img.write_bytes(bmp((0, 200, 0)))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    (data / "img_1.txt").write_text("a green thing")
    assert planned_jobs(work, None, *shards)["manifest"] == 1
    snakemake(work, *shards)
    index = (work / f"results/mine/shards/{shard_of('img_1.bmp', 3):05d}.jsonl").read_text()
    assert "a green thing" in index
    assert planned_jobs(work, None, *shards) == {}

    # 3. every image rejected: the job fails, and its reasons survive the failure
    out = snakemake(work, "results/bad/rejected.tsv", check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "no valid image left: 9 file(s) found, all rejected" in text, text[-3000:]
    assert "logs/merge_manifest/bad.rejected.tsv (kept after this failure)" in text
    assert not (work / "results/bad/rejected.tsv").exists()
    kept = (work / "logs/merge_manifest/bad.rejected.tsv").read_text(encoding="utf-8")
    got = {line.split("\t")[0]: line.split("\t")[1] for line in kept.splitlines()[1:]}
    assert got == expected

    # 4. a config file with a key given twice stops the plan, naming the file, line and key
    text = (work / "cfg.yaml").read_text()
    (work / "cfg.yaml").write_text(text + "mlflow:\n  experiment: again\n")
    out = snakemake(work, "-n", check=False)
    assert out.returncode != 0
    line = len(text.splitlines()) + 1
    assert f"cfg.yaml:{line}: duplicate key 'mlflow' (first on line 1)" in out.stdout + out.stderr
