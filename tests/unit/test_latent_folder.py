"""One encode job per latent folder (lorapipe.latent_folder): each shard's latent tar has the
bytes encode_shard writes, and a shard whose inputs did not change comes from the cache (a hard
link, checked first) instead of being encoded again: one changed shard re-encodes alone."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from lorapipe import latent_folder
from lorapipe.captions import CaptionSettings, caption_shard
from lorapipe.io import verify_file
from lorapipe.manifest import ScanSettings, list_images, scan_shard
from lorapipe.shards import ShardSettings, write_shard

IDENTITY = {"code": "c0de", "libs": {"torch": "x"}}


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def image_shard(root: Path, files: list[str], out: Path) -> Path:
    """An image shard (with its checksum sidecar, as rule shard writes it) of ``files``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    m, c = out.with_suffix(".m.jsonl"), out.with_suffix(".c.jsonl")
    scan_shard(root, files, ScanSettings(64, 0.5, 10**8, "#ffffff"), m)
    caption_shard(root, m, CaptionSettings("template", "a {trigger}", "x"), out.parent / "cc", c)
    write_shard(root, m, c, ShardSettings(64, 16, True, 10**8, "#ffffff"), out,
                out.with_suffix(".jsonl"), checksum=True)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_images) -> list[Path]:
    d = tmp_path_factory.mktemp("folder")
    files = list_images(demo_images)
    return [image_shard(demo_images, files[i * 3 : i * 3 + 3], d / f"{i:05d}.tar") for i in (0, 1)]


def model_files(model: Path) -> list[Path]:
    return sorted(p for p in model.rglob("*") if p.is_file())


def run(shards, out_dir: Path, model: Path, cache: Path, **kw) -> dict:
    """The folder job as Snakemake runs it: its outputs are deleted first."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    outs = [out_dir / Path(s).name for s in shards]
    kw = {"identity": IDENTITY, "batch_size": 4, **kw}
    return latent_folder.encode_folder(shards, outs, model, model_files(model), cache, **kw)


def test_bytes_are_encode_shards_and_unchanged_shards_come_from_the_cache(
    shards, tiny_model, tmp_path, monkeypatch
):
    from lorapipe.latents import encode_shard

    out, cache = tmp_path / "lat", tmp_path / "cache"
    assert run(shards, out, tiny_model, cache) == {"cached": 0, "encoded": 2, "pruned": 0}
    for s in shards:
        alone = tmp_path / "alone" / s.name
        encode_shard(s, tiny_model, alone, batch_size=4, checksum=True)
        assert sha(out / s.name) == sha(alone)
        assert verify_file(out / s.name)  # its sidecar records it
    first = {s.name: sha(out / s.name) for s in shards}

    # nothing changed: no encoding at all (torch is not even needed), same bytes, one inode
    monkeypatch.setattr(latent_folder, "_encode", lambda *a: pytest.fail("encoded again"))
    assert run(shards, out, tiny_model, cache) == {"cached": 2, "encoded": 0, "pruned": 0}
    assert {s.name: sha(out / s.name) for s in shards} == first
    assert all(verify_file(out / s.name) for s in shards)
    entries = sorted(p for p in cache.iterdir() if p.suffix == ".tar")
    assert [e.name.split(".")[0] for e in entries] == ["00000", "00001"]
    assert (out / "00000.tar").stat().st_ino == entries[0].stat().st_ino  # a link: no extra disk


def test_one_changed_shard_reencodes_alone_and_its_old_entry_goes(
    shards, tiny_model, demo_images, tmp_path
):
    out, cache = tmp_path / "lat", tmp_path / "cache"
    run(shards, out, tiny_model, cache)
    before = sha(out / "00000.tar")
    files = list_images(demo_images)
    changed = [shards[0], image_shard(demo_images, files[9:12], tmp_path / "new" / "00001.tar")]
    assert run(changed, out, tiny_model, cache) == {"cached": 1, "encoded": 1, "pruned": 2}
    assert sha(out / "00000.tar") == before
    assert len(list(cache.glob("00001.*.tar"))) == 1  # the new entry only


def test_a_damaged_entry_is_not_used_and_other_settings_miss(shards, tiny_model, tmp_path):
    out, cache = tmp_path / "lat", tmp_path / "cache"
    run(shards, out, tiny_model, cache)
    good = sha(out / "00000.tar")
    entry = next(cache.glob("00000.*.tar"))
    shutil.rmtree(out)  # the link is gone; rot the entry (as bit rot in a shared inode would)
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x04
    entry.write_bytes(bytes(data))
    assert run(shards, out, tiny_model, cache)["encoded"] == 1
    assert sha(out / "00000.tar") == good
    # another dtype, code or model is another key: everything is encoded for it
    other = {"code": "beef", "libs": IDENTITY["libs"]}
    assert run(shards, out, tiny_model, cache, identity=other)["encoded"] == 2
