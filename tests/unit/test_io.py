"""lorapipe.io: atomic writes under failure (full disk, errors), checksum sidecars, and the
consumers that refuse a damaged cached file (manifest, captions, image and latent shards)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from lorapipe import io as lio
from lorapipe.io import (
    CorruptFileError,
    atomic_path,
    atomic_paths,
    atomic_write_bytes,
    atomic_write_text,
    checksum_path,
    damage_token,
    read_checksum,
    remove_stale_temps,
    verify_file,
    write_checksum,
)


def leftovers(folder: Path) -> list[str]:
    """Temporary files (hidden ``.name.*.tmp``) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def flip_byte(path: Path, offset: int | None = None, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    with open(path, "r+b") as fh:  # in place, like bit rot or a stray write
        fh.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # make the change visible even on a coarse-mtime file system
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


# --- a full disk ---------------------------------------------------------------------------


class Disk:
    """A disk that can be made full: every atomic write's temporary file becomes /dev/full, so
    the kernel itself answers ENOSPC to the writes (no mount needed)."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.real = monkeypatch, lio._make_temp

    def _full_temp(self, path: Path) -> Path:
        tmp = self.real(path)
        tmp.unlink()
        tmp.symlink_to("/dev/full")
        return tmp

    def fill(self) -> None:
        self.monkeypatch.setattr(lio, "_make_temp", self._full_temp)

    def free(self) -> None:
        self.monkeypatch.setattr(lio, "_make_temp", self.real)


@pytest.fixture()
def disk(monkeypatch):
    return Disk(monkeypatch)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "d" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert leftovers(target.parent) == []


def test_error_in_body_keeps_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "good")
    with pytest.raises(ValueError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError("boom")
    assert target.read_text() == "good"
    assert leftovers(tmp_path) == []


def test_disk_full_is_a_clear_error_keeps_previous_file_then_retry_works(tmp_path, disk):
    """ENOSPC (from the kernel, via /dev/full): an OSError that keeps the errno, names the file
    and the free space; the old file is intact; no temp file; a retry after freeing completes."""
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous good bytes")
    disk.fill()
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"x" * 100_000)
    e = info.value
    assert e.errno == errno.ENOSPC
    assert str(target) in str(e) and "MiB free" in str(e) and "free some space" in str(e)
    assert "\n" not in str(e)
    assert target.read_bytes() == b"previous good bytes"
    assert leftovers(tmp_path) == [] and not any(p.is_symlink() for p in tmp_path.iterdir())
    disk.free()
    atomic_write_bytes(target, b"x" * 100_000)
    assert target.read_bytes() == b"x" * 100_000


def test_disk_full_in_a_group_commits_none_of_them(tmp_path, disk):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("A")
    b.write_text("B")
    disk.fill()
    with pytest.raises(OSError, match="No space left") as info:
        with atomic_paths(a, b) as (ta, tb):
            with contextlib.ExitStack() as stack:
                for t in (ta, tb):
                    stack.enter_context(open(t, "wb")).write(b"new")
    assert str(a) in str(info.value) and str(b) in str(info.value)
    assert (a.read_text(), b.read_text()) == ("A", "B")
    assert leftovers(tmp_path) == []


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A real tmpfs of ``size`` at ``folder`` (needs root and mount rights; skipped otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` until about ``leave`` bytes are free."""
    ballast = folder / "ballast"
    with open(ballast, "wb") as fh:
        with contextlib.suppress(OSError):
            while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave + 4096:
                fh.write(b"\0" * 4096)
                fh.flush()
    return ballast


def test_disk_full_on_a_real_small_tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "256k") as mnt:
        target = mnt / "f.bin"
        atomic_write_bytes(target, b"good")
        ballast = fill(mnt, leave=8192)
        with pytest.raises(OSError) as info:
            atomic_write_bytes(target, os.urandom(64 * 1024))
        assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
        assert target.read_bytes() == b"good"
        assert leftovers(mnt) == []
        ballast.unlink()  # free space, then retry
        data = os.urandom(64 * 1024)
        atomic_write_bytes(target, data)
        assert target.read_bytes() == data


def test_remove_stale_temps_only_touches_that_files_temps(tmp_path):
    target = tmp_path / "00001.tar"
    for name in (".00001.tar.abc.tmp", ".00001.tar.def.tmp", ".00002.tar.abc.tmp", "00001.tar"):
        (tmp_path / name).write_text("x")
    assert remove_stale_temps(target, tmp_path / "missing" / "x") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".00002.tar.abc.tmp", "00001.tar"]


# --- file modes ----------------------------------------------------------------------------


@pytest.fixture(params=[0o002, 0o022], ids=["umask002", "umask022"])
def umask(request):
    """The process umask for one test (restored after it)."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """Every atomic writer leaves the mode ``open(path, "w")`` gives a new file under the umask
    (not mkstemp's 0600), also over an older 0600 file; a temporary folder gets mkdir's."""
    from lorapipe.io import make_temp_dir, save_safetensors

    plain = tmp_path / "plain"
    with open(plain, "w"):
        pass
    want = 0o666 & ~umask
    assert mode(plain) == want
    old = tmp_path / "old.txt"
    old.write_text("before")
    old.chmod(0o600)  # as every atomic write left it before
    atomic_write_text(old, "after")
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    with atomic_paths(tmp_path / "p1", tmp_path / "d" / "p2") as (t1, t2):
        t1.write_bytes(b"1")
        t2.write_bytes(b"2")
    write_checksum(tmp_path / "b.bin")
    save_safetensors({}, tmp_path / "t.safetensors", {"k": "v"})
    written = ["old.txt", "b.bin", "p1", "d/p2", "b.bin.sha256", "t.safetensors"]
    assert {f: mode(tmp_path / f) for f in written} == dict.fromkeys(written, want)
    assert mode(tmp_path / "d") == 0o777 & ~umask
    assert mode(make_temp_dir(tmp_path)) == 0o777 & ~umask
    assert leftovers(tmp_path) == []


def test_set_new_file_modes_fixes_what_a_library_wrote(tmp_path, umask):
    """safetensors 0.8's save_file (behind every ``save_pretrained``) writes 0600 whatever the
    umask; `set_new_file_modes` gives such a tree the modes open() / mkdir() would have."""
    import torch
    from safetensors.torch import save_file

    from lorapipe.io import current_umask, set_new_file_modes

    assert current_umask() == umask
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True, mode=0o700)
    save_file({"w": torch.zeros(2)}, model / "unet" / "w.safetensors")
    assert mode(model / "unet" / "w.safetensors") == 0o600  # the library's mode
    outside = tmp_path / "outside"
    outside.write_text("x")
    outside.chmod(0o600)
    (model / "link").symlink_to(outside)
    set_new_file_modes(model)
    assert mode(model / "unet" / "w.safetensors") == 0o666 & ~umask
    assert mode(model / "unet") == mode(model) == 0o777 & ~umask
    assert mode(outside) == 0o600  # a link's target is not touched


# --- checksums and the consumers' checks ---------------------------------------------------


def test_checksum_sidecar_is_sha256sum_format(tmp_path):
    f = tmp_path / "00000.tar"
    f.write_bytes(b"data")
    digest = write_checksum(f)
    assert digest == hashlib.sha256(b"data").hexdigest()
    assert checksum_path(f).read_text() == f"{digest}  00000.tar\n"
    proc = subprocess.run(["sha256sum", "-c", "00000.tar.sha256"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_checksum(f) == digest and verify_file(f) is True


def test_verify_without_sidecar_is_unchecked_not_an_error(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("{}\n")
    assert verify_file(f) is False
    with pytest.raises(FileNotFoundError):
        verify_file(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("damage", ["data", "sidecar", "truncated"])
def test_mismatch_deletes_file_and_sidecar_and_names_the_file(tmp_path, damage):
    f = tmp_path / "00003.jsonl"
    f.write_text('{"a": 1}\n' * 50)
    write_checksum(f)
    if damage == "data":
        flip_byte(f, keep_mtime=True)
    elif damage == "sidecar":
        flip_byte(checksum_path(f), offset=3)
    else:
        f.write_text('{"a": 1}\n' * 10)
    with pytest.raises(CorruptFileError) as info:
        verify_file(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}: corrupted") and "rerun snakemake" in msg and "\n" not in msg
    assert not f.exists() and not checksum_path(f).exists()


def test_damage_token_is_stable_and_changes_only_for_new_damage(tmp_path):
    """The params token: "" while intact; a new value once damaged; the same value after the
    rebuild (no second rebuild); a new value for a new damage; nothing recorded by a dry run."""
    f = tmp_path / "00000.tar"
    assert damage_token(f) == ""  # missing
    f.write_bytes(os.urandom(4096))
    write_checksum(f)
    assert damage_token(f) == ""
    flip_byte(f)
    assert damage_token(f, record=False) == (first := damage_token(f, record=False))
    assert first.startswith("damaged:")
    assert not Path(f"{f}.damaged").exists()  # a dry run records nothing
    assert damage_token(f) == first and Path(f"{f}.damaged").exists()
    # the workflow rebuilds it (outputs are removed first, then written: data, then checksum)
    good = os.urandom(4096)
    f.unlink()
    checksum_path(f).unlink()
    time.sleep(0.01)
    f.write_bytes(good)
    write_checksum(f)
    assert damage_token(f) == first  # same as the value recorded with the rebuild: no rerun
    flip_byte(f)
    second = damage_token(f)
    assert second.startswith("damaged:") and second != first


def test_damage_token_for_a_touched_but_intact_file(tmp_path):
    f = tmp_path / "00000.jsonl"
    f.write_text("x\n")
    write_checksum(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert damage_token(f) == ""
    # the sidecar was touched, so the next call does not hash the file again
    assert checksum_path(f).stat().st_mtime_ns >= f.stat().st_mtime_ns


# --- stage functions: refuse damaged inputs; atomic under a full disk ----------------------


@pytest.fixture()
def shard_inputs(tmp_path):
    """A small dataset scanned and captioned through the real stage functions, with checksums."""
    from PIL import Image

    from lorapipe.captions import CaptionSettings, caption_shard
    from lorapipe.manifest import ScanSettings, list_images, scan_shard

    root = tmp_path / "data"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (80 + 16 * i, 64), (40 * i, 90, 200)).save(root / f"img{i}.png")
    manifest, captions = tmp_path / "m" / "00000.jsonl", tmp_path / "c" / "00000.jsonl"
    scan_shard(root, list_images(root), ScanSettings(64, 0.5, 10**7, "#ffffff"), manifest,
               checksum=True)
    caption_shard(root, manifest, CaptionSettings("template", "a {trigger}", "x"),
                  tmp_path / "cache", captions, checksum=True)
    return root, manifest, captions


def _write(shard_inputs, out: Path):
    from lorapipe.shards import ShardSettings, write_shard

    root, manifest, captions = shard_inputs
    settings = ShardSettings(64, 16, True, 10**7, "#ffffff")
    return write_shard(root, manifest, captions, settings, out / "00000.tar", out / "00000.jsonl",
                       checksum=True)


def test_stage_outputs_have_checksums_and_stay_byte_reproducible(shard_inputs, tmp_path):
    _write(shard_inputs, tmp_path / "a")
    _write(shard_inputs, tmp_path / "b")
    for name in ("00000.tar", "00000.tar.sha256", "00000.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert verify_file(tmp_path / "a" / "00000.tar")
    for p in shard_inputs[1:]:
        assert verify_file(p)


def test_caption_stage_refuses_a_damaged_manifest(shard_inputs, tmp_path):
    from lorapipe.captions import CaptionSettings, caption_shard

    root, manifest, _ = shard_inputs
    flip_byte(manifest, keep_mtime=True)
    with pytest.raises(CorruptFileError, match=f"^{manifest}: corrupted"):
        caption_shard(root, manifest, CaptionSettings("template"), tmp_path / "cache",
                      tmp_path / "out.jsonl", checksum=True)
    assert not manifest.exists() and not (tmp_path / "out.jsonl").exists()


def test_shard_stage_refuses_damaged_captions_and_keeps_the_old_shard(shard_inputs, tmp_path):
    out = tmp_path / "out"
    _write(shard_inputs, out)
    before = (out / "00000.tar").read_bytes()
    captions = shard_inputs[2]
    flip_byte(captions, offset=20, keep_mtime=True)
    with pytest.raises(CorruptFileError, match=f"^{captions}: corrupted"):
        _write(shard_inputs, out)
    assert not captions.exists()
    assert (out / "00000.tar").read_bytes() == before and leftovers(out) == []


def test_merge_refuses_a_damaged_shard_manifest(shard_inputs, tmp_path):
    from lorapipe.manifest import merge_manifests

    manifest = shard_inputs[1]
    flip_byte(manifest, keep_mtime=True)
    with pytest.raises(CorruptFileError, match=str(manifest)):
        merge_manifests([str(manifest)], tmp_path / "all.jsonl", tmp_path / "rejected.tsv")


def test_encode_stage_refuses_a_damaged_image_shard_before_loading_a_model(shard_inputs, tmp_path):
    from lorapipe.latents import encode_shard

    _write(shard_inputs, tmp_path / "s")
    tar = tmp_path / "s" / "00000.tar"
    flip_byte(tar, keep_mtime=True)
    with pytest.raises(CorruptFileError, match=f"^{tar}: corrupted.*rerun snakemake"):
        encode_shard(tar, tmp_path / "no-model-needed", tmp_path / "l" / "00000.tar",
                     checksum=True)
    assert not tar.exists() and not (tmp_path / "l" / "00000.tar").exists()


def test_shard_stage_under_a_full_disk(shard_inputs, tmp_path, disk):
    """write_shard on a full disk: clear error naming the tar, previous tar/index/checksum
    intact, no temp file; after freeing space the retry writes the same bytes as before."""
    out = tmp_path / "out"
    _write(shard_inputs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"00000.tar", "00000.jsonl", "00000.tar.sha256"}
    disk.fill()
    with pytest.raises(OSError) as info:
        _write(shard_inputs, out)
    disk.free()
    assert info.value.errno == errno.ENOSPC and str(out / "00000.tar") in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == []
    (out / "00000.tar").unlink()  # force a real rewrite on retry
    _write(shard_inputs, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_shard_stage_on_a_real_full_tmpfs(shard_inputs, tmp_path):
    with small_tmpfs(tmp_path / "mnt", "512k") as mnt:
        _write(shard_inputs, mnt)
        before = {p.name: p.read_bytes() for p in mnt.iterdir()}
        ballast = fill(mnt, leave=4096)
        with pytest.raises(OSError) as info:
            _write(shard_inputs, mnt)
        assert info.value.errno == errno.ENOSPC
        ballast.unlink()
        assert {p.name: p.read_bytes() for p in mnt.iterdir()} == before
        assert leftovers(mnt) == []
        _write(shard_inputs, mnt)
        assert {p.name: p.read_bytes() for p in mnt.iterdir()} == before


# --- training's view: latent shards --------------------------------------------------------


def latent_tar(path: Path, samples: dict, checksum: bool = True) -> Path:
    """A latent shard with the layout encode_shard writes ({key: tensors or raw bytes})."""
    import webdataset as wds
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh, wds.TarWriter(fh, mtime=0.0) as writer:
        for key, t in samples.items():
            blob = t if isinstance(t, bytes) else save(t)
            writer.write({"__key__": key, "latents.safetensors": blob,
                          "json": json.dumps({"caption": key})})
    if checksum:
        write_checksum(path)
    return path


def tensors(fill_value: float = 0.5):
    import torch

    return {"mean": torch.full((4, 8, 8), fill_value), "logvar": torch.zeros(4, 8, 8),
            "text": torch.ones(77, 32)}


def test_load_latent_shards_reads_verified_shards(tmp_path):
    from lorapipe.latents import load_latent_shards

    a = latent_tar(tmp_path / "00000.tar", {"k2": tensors(), "k1": tensors()})
    b = latent_tar(tmp_path / "00001.tar", {"k0": tensors()}, checksum=False)
    out = load_latent_shards([str(a), str(b)])
    assert [s["key"] for s in out] == ["k0", "k1", "k2"]
    assert out[0]["meta"] == {"caption": "k0"} and tuple(out[0]["mean"].shape) == (4, 8, 8)


def test_training_refuses_a_damaged_latent_shard_and_deletes_it(tmp_path):
    from lorapipe.latents import load_latent_shards

    good = latent_tar(tmp_path / "00000.tar", {"k1": tensors()})
    bad = latent_tar(tmp_path / "00001.tar", {"k2": tensors(), "k3": tensors()})
    flip_byte(bad, offset=2000, keep_mtime=True)
    with pytest.raises(CorruptFileError, match=f"^{bad}: corrupted.*rerun snakemake"):
        load_latent_shards([str(good), str(bad)])
    assert good.exists() and not bad.exists() and not checksum_path(bad).exists()


@pytest.mark.parametrize("checksum", [True, False])
def test_training_refuses_samples_that_do_not_decode(tmp_path, checksum):
    """A shard whose sample does not decode is refused naming the sample; with a matching
    checksum it was written so (kept, for a look); without one it is deleted to be rebuilt."""
    from lorapipe.latents import load_latent_shards

    bad = latent_tar(tmp_path / "00000.tar", {"k1": tensors(), "k2": b"not safetensors"},
                     checksum=checksum)
    with pytest.raises(CorruptFileError, match=rf"^{bad}: cannot be decoded \(sample k2: "):
        load_latent_shards([str(bad)])
    assert bad.exists() == checksum


def test_training_refuses_non_finite_latents(tmp_path):
    from lorapipe.latents import load_latent_shards

    bad = latent_tar(tmp_path / "00000.tar", {"k1": tensors(float("nan"))})
    with pytest.raises(CorruptFileError, match=r"sample k1: non-finite values in mean"):
        load_latent_shards([str(bad)])


def test_training_refuses_a_latent_sample_without_its_tensors(tmp_path):
    import torch

    from lorapipe.latents import load_latent_shards

    bad = latent_tar(tmp_path / "00000.tar", {"k1": {"mean": torch.zeros(4, 8, 8)}})
    with pytest.raises(CorruptFileError, match=r"sample k1: no logvar tensor"):
        load_latent_shards([str(bad)])


def test_localized_finds_a_params_folder_among_storage_inputs():
    from lorapipe.io import localized

    store = ".snakemake/storage/s3/bucket/wf"
    model = [f"{store}/results/models/tiny/model_index.json", f"{store}/results/models/tiny/vae/c"]
    assert localized("results/models/tiny", model) == f"{store}/results/models/tiny"
    assert localized("results/models/tiny/", ["x.tar", *model]) == f"{store}/results/models/tiny"
    # a single file given as the param is the retrieved file itself
    st = f"{store}/models/v1-5.safetensors"
    assert localized("models/v1-5.safetensors", [st]) == st
    # without storage, or with no input under it, the param is what the job uses
    assert localized("results/models/tiny", ["results/models/tiny/unet/c"]) == "results/models/tiny"
    assert localized("data/mine", [f"{store}/results/mine/manifest/00000.jsonl"]) == "data/mine"
    assert localized(None, model) is None
    # a longer name sharing the prefix is not a match
    assert localized("results/models/tin", model) == "results/models/tin"


def test_staging_dir_removes_a_killed_build_of_the_same_output_only(tmp_path):
    """A build killed mid-write (kill -9) leaves its staging folder; the next build of that
    output removes it, and leaves another output's (which may be building right now)."""
    from lorapipe.io import staging_dir

    out = tmp_path / "models" / "tiny-sd"
    killed = staging_dir(out)
    (killed / "model").mkdir()
    (killed / "model" / "config.json").write_text("{}")
    other = staging_dir(tmp_path / "models" / "tiny-sdxl")
    fresh = staging_dir(out)
    assert not killed.exists() and fresh.is_dir() and other.is_dir()
    assert fresh.parent == out.parent and fresh.name.startswith(".tiny-sd.staging-")
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tiny-sd.")] == [fresh.name]
