"""Atomic file writing: nothing half-written is ever taken as done.

Every output is written to a temporary name in the same folder, flushed and fsynced, then renamed
over the final name (os.replace is atomic on POSIX). A kill or a full disk leaves the previous file,
or no file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted key order.

    safetensors (0.8) writes the ``__metadata__`` map in hash-map order, which differs between
    processes and even between calls: same tensors, same metadata, different bytes. Sorting the
    header makes files byte-reproducible. Tensor data offsets are relative to the end of the
    header, so only the header and its length change.
    """
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    blob = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data[8 + n :]


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors atomically as a byte-reproducible safetensors file."""
    from safetensors.torch import save

    atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


def canonicalize_file(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file (written by another library) in canonical form, atomically."""
    atomic_write_bytes(path, canonical_safetensors(Path(path).read_bytes()))
