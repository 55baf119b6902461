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
