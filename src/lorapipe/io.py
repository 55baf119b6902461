"""Atomic file writing and file integrity: nothing half-written or damaged is ever taken as done.

Every output is written to a temporary name in the same folder, flushed and fsynced, then renamed
over the final name (os.replace is atomic on POSIX). A kill or a full disk leaves the previous file,
or no file, never a truncated one; a full disk is reported naming the file and the free space.
A written file gets the mode a plain ``open()`` would give a new file (0666 less the umask), also
when it replaces an older one.

Cached stage outputs (shard manifests, captions, image and latent shards) also get a checksum
sidecar ``<file>.sha256`` (``sha256sum`` format, so ``sha256sum -c`` reads it), written after the
file itself. Consumers call :func:`verify_file` before use: a file that no longer matches its
checksum is deleted, with its sidecar, and :class:`CorruptFileError` names it, so a rerun of the
workflow rebuilds it. :func:`damage_token` makes the same check cheap enough to run while Snakemake
builds its DAG, so that a file changed after it was written is rebuilt in the same invocation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

CHECKSUM_SUFFIX = ".sha256"
DAMAGE_SUFFIX = ".damaged"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class CorruptFileError(RuntimeError):
    """A cached file does not match its recorded checksum, or its content cannot be decoded."""


def _make_temp(path: Path) -> Path:
    """An empty temporary file beside ``path`` (hidden, ``.tmp``), so the rename stays atomic.

    Created as a plain ``open(path, "w")`` creates a file: mode 0666 less the umask (and a
    folder's default ACL), so the renamed file is as readable as any other new file of the
    caller (``tempfile.mkstemp`` would make every output 0600, unreadable to a teammate, a WebUI
    running as another user or an MLflow server under another account). ``O_EXCL`` with a
    random name keeps concurrent writers of the same file apart, as mkstemp does.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.fspath(path))


def make_temp_dir(parent: str | os.PathLike, prefix: str = ".tmp-") -> Path:
    """A new, empty hidden folder in ``parent`` with the mode ``os.mkdir`` gives under the
    umask (``tempfile.mkdtemp`` makes it 0700): for a folder that is renamed into place."""
    parent = Path(parent)
    for _ in range(100):
        d = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            d.mkdir(0o777)
        except FileExistsError:
            continue
        return d
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.fspath(parent))


def staging_dir(out: str | os.PathLike) -> Path:
    """A new hidden folder beside ``out`` to build it in before it is renamed into place, once
    the ones a killed build of the same ``out`` left (``.<name>.staging-*``) are removed: one
    job writes a given output at a time, so any found is stale. Other outputs' are kept."""
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{glob_escape(out.name)}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def _disk_full_error(e: OSError, paths: list[Path]) -> OSError:
    folder = paths[0].parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder}"
    except OSError:
        free = f"free space in {folder} unknown"
    names = ", ".join(map(str, paths))
    return OSError(
        e.errno,
        f"{os.strerror(e.errno)} while writing {names} ({free}); "
        "the previous file, if any, is kept: free some space and rerun",
    )


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and put back (not thread-safe, as umask is not)
    os.umask(mask)
    return mask


def set_new_file_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a new file (0666) or folder (0777) gets
    under the umask: for a tree another library wrote with its own modes (safetensors 0.8's
    ``save_file``, behind ``save_pretrained``, makes every weights file 0600). Links are left
    alone."""
    mask = current_umask()
    root = Path(root)
    if root.is_symlink():
        return
    os.chmod(root, (0o777 if root.is_dir() else 0o666) & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            if not p.is_symlink():
                os.chmod(p, (0o777 if name in dirs else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``paths``; on success each is renamed to its final name.

    The renames happen in the given order, after every temporary file is complete and fsynced;
    on any error, or a kill, no final name is touched and no temporary file is left (a kill -9
    leaves at most hidden ``.<name>.*.tmp`` files, see :func:`remove_stale_temps`). A full disk
    (ENOSPC, EDQUOT) is re-raised as an OSError with the same errno naming the file.
    """
    finals = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for p in finals:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(_make_temp(p))
        yield list(tmps)
        for tmp in tmps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        for tmp, p in zip(tmps, finals, strict=True):
            os.replace(tmp, p)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full_error(e, finals) from e
        raise
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(*paths: str | os.PathLike) -> int:
    """Delete temporary files that a killed writer of ``paths`` left behind; returns the count.

    Only for outputs with a single writer at a time (a Snakemake job's own outputs): a temporary
    file of a concurrent writer of the same name would be removed too.
    """
    n = 0
    for p in map(Path, paths):
        if not p.parent.is_dir():
            continue
        for stale in p.parent.glob(f".{glob_escape(p.name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                n += 1
    return n


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# --- checksums -----------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: str | os.PathLike) -> Path:
    """The checksum sidecar of ``path``: ``<path>.sha256``."""
    return Path(f"{os.fspath(path)}{CHECKSUM_SUFFIX}")


def checksum_line(path: str | os.PathLike, digest: str | None = None) -> str:
    """The sidecar text of ``path`` (``sha256sum`` format, file name without folder)."""
    return f"{digest or sha256_file(path)}  {Path(path).name}\n"


def write_checksum(path: str | os.PathLike, digest: str | None = None) -> str:
    """Write ``<path>.sha256`` for the (complete) file ``path``; returns the digest."""
    line = checksum_line(path, digest)
    atomic_write_text(checksum_path(path), line)
    return line.split()[0]


def read_checksum(path: str | os.PathLike) -> str | None:
    """The digest recorded for ``path``; None without a sidecar, "" for an unreadable one."""
    try:
        text = checksum_path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    parts = text.split()
    if len(parts) == 2 and len(parts[0]) == 64 and parts[1] == Path(path).name:
        with contextlib.suppress(ValueError):
            int(parts[0], 16)
            return parts[0]
    return ""


def discard(path: str | os.PathLike) -> None:
    """Delete a damaged file and its checksum sidecar (so that the workflow rebuilds them)."""
    for p in (Path(path), checksum_path(path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def verify_file(path: str | os.PathLike, delete: bool = True) -> bool:
    """Check ``path`` against its checksum sidecar before use.

    Returns:
        True when it matches, False when there is no sidecar to check against (a file made
        outside the workflow).

    Raises:
        CorruptFileError: on a mismatch, after deleting the file and its sidecar (``delete``),
            with a one-line message naming the file.
        FileNotFoundError: when ``path`` does not exist.
    """
    expected = read_checksum(path)
    if expected is None:
        if not Path(path).exists():
            raise FileNotFoundError(errno.ENOENT, "no such file", os.fspath(path))
        return False
    got = sha256_file(path)
    if got == expected:
        return True
    if delete:
        discard(path)
    what = f"sha256 {got[:16]}… but {checksum_path(path).name} records " + (
        f"{expected[:16]}…" if expected else "nothing readable"
    )
    raise CorruptFileError(
        f"{path}: corrupted ({what}); "
        + ("deleted it: rerun snakemake to rebuild it" if delete else "rebuild it")
    )


def damage_token(path: str | os.PathLike, record: bool = True) -> str:
    """A Snakemake param that changes when ``path`` was damaged after it was written.

    Cheap: the file is hashed only when it was modified after its sidecar (a flipped byte, a
    partial copy, an edit), not on every call. A mismatch gives a new token, and Snakemake's
    params rerun trigger rebuilds the file (and what depends on it) in the same invocation. The
    token is kept in ``<path>.damaged`` (with ``record``), so it stays the same after the rebuild
    and the rebuilt file is not rebuilt again. Damage that keeps the mtime (bit rot) is found by
    :func:`verify_file` in the consumer instead.

    Returns:
        "" for a file never found damaged (or missing); otherwise the last damage's token.
    """
    path = Path(path)
    record_file = Path(f"{path}{DAMAGE_SUFFIX}")
    try:
        data_ns = path.stat().st_mtime_ns
        if data_ns > checksum_path(path).stat().st_mtime_ns:
            expected, got = read_checksum(path), sha256_file(path)
            if got != expected:
                side_ns = checksum_path(path).stat().st_mtime_ns
                token = f"damaged:{got[:16]}:{side_ns}"
                if _recorded_token(record_file) != token:
                    print(
                        f"lorapipe: {path}: changed after it was written (sha256 {got[:16]}…, "
                        f"recorded {(expected or 'nothing')[:16]}…): it will be rebuilt",
                        file=sys.stderr,
                    )
                    if record:
                        atomic_write_text(
                            record_file,
                            json.dumps({"token": token, "file": str(path), "expected": expected,
                                        "found": got}) + "\n",
                        )
                return token
            if record:  # intact, only touched: no need to hash it again next time
                now = time.time_ns()
                os.utime(checksum_path(path), ns=(now, max(now, data_ns)))
    except FileNotFoundError:
        pass
    return _recorded_token(record_file)


def _recorded_token(record_file: Path) -> str:
    try:
        return str(json.loads(record_file.read_text(encoding="utf-8"))["token"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return ""


def integrity_param(pattern: str, workflow) -> Callable:
    """A Snakemake ``params:`` function: :func:`damage_token` of the rule's output ``pattern``.

    It takes only ``wildcards``, so Snakemake compares its value with the one recorded when the
    output was made (a params function of ``output`` would not be compared). Records are written
    by the main Snakemake process of a real run only, never by a dry run or a cluster job.
    """

    def integrity(wildcards) -> str:
        record = workflow.is_main_process and not workflow.dryrun
        return damage_token(pattern.format(**dict(wildcards.items())), record=record)

    return integrity


def localized(path: str | None, files) -> str | None:
    """Where this job sees ``path``, a folder or file a rule passes as a ``params:`` value.

    With a storage provider (``--default-storage-provider s3``), Snakemake retrieves a job's
    declared inputs under ``.snakemake/storage/<provider>/<bucket>/...`` and hands the job those
    local paths, but params stay as written. A folder whose files the rule also declares as
    inputs (a base model, a generated dataset) is found again through them: the local prefix of
    the first input that lies under ``path``. Without storage, or when no input lies under it
    (a folder dataset read in place), ``path`` is returned unchanged.
    """
    if not path:
        return path
    given = os.path.normpath(str(path))
    norm = given.lstrip(os.sep)
    for f in files:
        f = os.path.normpath(str(f))
        if f == given or f.startswith(given + os.sep):
            return path  # the job sees its inputs where the params say
        if f.endswith(os.sep + norm):
            return f
        i = f.find(os.sep + norm + os.sep)
        if i >= 0:
            return f[: i + 1 + len(norm)]
    return path


# --- safetensors ---------------------------------------------------------------------------


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
