"""Cheap fingerprints for rerun triggers and run identity. No torch, no diffusers.

Snakemake's "code" trigger sees a rule's script, not the package it imports, so every rule puts
``code_version(<modules it uses>)`` into its params: editing train.py restales training and nothing
upstream of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent


def code_version(*modules: str) -> str:
    """sha256 (16 hex) of the source of the named lorapipe modules: ``code_version("train")``."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        h.update(name.encode() + b"\0" + (PKG_DIR / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def versions(*dists: str) -> dict[str, str]:
    """Installed versions of distributions (from metadata; nothing is imported)."""
    out = {}
    for d in dists:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "absent"
    return out


def digest(obj) -> str:
    """sha256 of a JSON-serialisable object, key order independent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(paths) -> str:
    """sha256 over several files' names and contents, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _hash_cache_dir() -> Path:
    root = os.environ.get("LORAPIPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorapipe"
    )
    return Path(root) / "sha256"


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content, remembered by (absolute path, size, mtime_ns, inode).

    Base models are gigabytes and every encode job fingerprints the VAE it uses: hashing a 4 GB
    single-file checkpoint once per shard would cost more than encoding. Entries live in
    ``$LORAPIPE_CACHE/sha256/`` (default ``~/.cache/lorapipe``), one small file each, written
    atomically, so concurrent jobs never corrupt them; a missing or unreadable cache only costs
    a re-hash.
    """
    from .io import atomic_write_text, sha256_file

    st = os.stat(path)
    ident = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    entry = _hash_cache_dir() / hashlib.sha256(ident.encode()).hexdigest()
    try:
        value = entry.read_text().strip()
        if len(value) == 64:
            return value
    except OSError:
        pass
    value = sha256_file(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(entry, value + "\n")
    except OSError:  # a read-only home must not stop a run
        pass
    return value


def tree_digest(path: str | os.PathLike, part: str | None = None) -> str:
    """sha256 over a model's (or one component folder's) files: relative names and contents.

    ``path`` is a single file (a single-file checkpoint: ``part`` is ignored, the file is the
    whole model) or a folder. File contents come from `cached_sha256`, so a re-run reads nothing.
    """
    p = Path(path)
    if p.is_file():
        files, root = [p], p.parent
    else:
        base = p / part if part else p
        files, root = sorted(f for f in base.rglob("*") if f.is_file()), p
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + cached_sha256(f).encode())
    return h.hexdigest()


def git_state(repo: str | os.PathLike) -> dict[str, str | bool]:
    """The commit of the workflow checkout and whether it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": False}


REPO_ROOT_GUESS = PKG_DIR.parents[1]
