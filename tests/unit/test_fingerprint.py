"""File-hash cache and model digests: computed once, never stale when a file changes."""

from __future__ import annotations

import hashlib
import os

from lorapipe.fingerprint import cached_sha256, tree_digest


def _same_stat_rewrite(path, data: bytes) -> None:
    """Replace a file's content in place keeping size and mtime (what the cache trusts)."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cached_sha256_is_computed_once_and_refreshed_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"a" * 1000)
    first = cached_sha256(f)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 1

    # Same size and mtime: the cache answers without reading (proves it is used).
    _same_stat_rewrite(f, b"b" * 1000)
    assert cached_sha256(f) == first
    # A new mtime (any real edit) is a new entry: the true digest.
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cached_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_unwritable_cache_still_hashes(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("LORAPIPE_CACHE", str(blocker))
    f = tmp_path / "f.bin"
    f.write_bytes(b"xyz")
    assert cached_sha256(f) == hashlib.sha256(b"xyz").hexdigest()


def test_tree_digest_parts_and_single_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    for part, data in (("vae", b"v1"), ("unet", b"u1")):
        (model / part).mkdir(parents=True)
        (model / part / "w.safetensors").write_bytes(data)
    whole, vae = tree_digest(model), tree_digest(model, "vae")
    assert whole != vae
    (model / "unet" / "w.safetensors").write_bytes(b"u2")  # another part changed
    assert tree_digest(model, "vae") == vae
    assert tree_digest(model) != whole
    # Renaming a file changes the digest (names are part of a model's identity).
    os.rename(model / "vae" / "w.safetensors", model / "vae" / "x.safetensors")
    assert tree_digest(model, "vae") != vae
    single = tmp_path / "ckpt.safetensors"
    single.write_bytes(b"whole model")
    assert tree_digest(single, "vae") == tree_digest(single)


def test_processes_hashing_one_file_at_once_hash_it_once(tmp_path):
    """run_config and an encode job on a fresh base model: the second waits for the first's
    entry instead of reading gigabytes again."""
    import subprocess
    import sys
    import textwrap

    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"w" * 1000)
    calls = tmp_path / "calls"
    code = textwrap.dedent(f"""
        import time
        import lorapipe.io as io
        real = io.sha256_file
        def slow(path, *args, **kw):  # a 4 GB file: long enough for the other to ask too
            with open({str(calls)!r}, "a") as fh:
                fh.write("hash\\n")
            time.sleep(3)
            return real(path, *args, **kw)
        io.sha256_file = slow
        from lorapipe.fingerprint import cached_sha256
        print(cached_sha256({str(f)!r}))
    """)
    env = {**os.environ, "LORAPIPE_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == [hashlib.sha256(b"w" * 1000).hexdigest()] * 2
    assert calls.read_text() == "hash\n"
