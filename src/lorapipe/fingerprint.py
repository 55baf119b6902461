"""Cheap fingerprints for rerun triggers and run identity. No torch, no diffusers.

Snakemake's "code" trigger sees a rule's script (by its mtime), not the package it imports, so
every rule puts ``script_code(<its script>)`` into its params: a digest of every lorapipe module
the script reaches through its imports, found statically (`script_modules`). Editing train.py
restales the stages that import it, directly or not, and nothing else; no module list is kept by
hand, so a new or split module is covered the moment something imports it. The few modules
that decide only where a job runs and how it is timed or logged (`OUTPUT_NEUTRAL`) are followed
through but not digested: editing them restales nothing.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent


def code_version(*modules: str) -> str:
    """sha256 (16 hex) of the source of the named top-level lorapipe modules, an explicit list:
    ``code_version("train")``. Rules use `script_code`, which finds the list itself."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        h.update(name.encode() + b"\0" + (PKG_DIR / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


# -- Code a stage runs: the import closure of its script ------------------------------------------
#
# Per process, nothing is read twice: every rule of a Snakemake plan calls `script_code`, and the
# modules they reach overlap. The caches assume the source does not change while a process plans.
_LOCATE: dict[tuple[Path, str], tuple[Path | None, bool] | None] = {}
_IMPORTS: dict[tuple[Path, str, Path], frozenset[str]] = {}
_CLOSURES: dict[tuple[Path, Path], tuple[str, ...]] = {}
_DIGESTS: dict[tuple[Path, tuple[str, ...]], str] = {}
_EDGES: dict[tuple[Path, str], tuple[str, ...]] = {}

# Modules of the package (paths relative to it) whose source never reaches what a stage writes:
# they decide where a job's process runs (`warm`: in the warm worker or cold, the same code
# either way), how its phases are timed (`jobtime`: a .times.json that is no target) and how
# it logs (`logs`: the log file's format). Their bytes stay out of every code param, so an edit
# to them does not make every user re-encode and retrain (an edit to warm did, stop 25). The
# modules they import are still followed and digested. A module belongs here only if it imports
# no package module but these (tests/unit/test_script_code.py checks it).
OUTPUT_NEUTRAL = ("jobtime.py", "logs.py", "warm.py")


def clear_code_cache() -> None:
    """Forget what `script_modules` and `script_code` found (for a process that edits source)."""
    for cache in (_LOCATE, _IMPORTS, _CLOSURES, _DIGESTS, _EDGES):
        cache.clear()


def _locate(src_root: Path, name: str) -> tuple[Path | None, bool] | None:
    """(source file or None, is a package) of dotted module ``name`` under ``src_root``; None
    when there is no such module. Like Python: a package folder before a module file, then a
    folder without ``__init__.py`` (a namespace package: no source of its own)."""
    key = (src_root, name)
    if key not in _LOCATE:
        base = os.path.join(src_root, *name.split("."))  # os.path: a plan makes ~1700 calls
        if os.path.isfile(init := os.path.join(base, "__init__.py")):
            found = (Path(init), True)
        elif os.path.isfile(base + ".py"):
            found = (Path(base + ".py"), False)
        elif os.path.isdir(base):
            found = (None, True)
        else:
            found = None
        _LOCATE[key] = found
    return _LOCATE[key]


def _resolve_from(node: ast.ImportFrom, name: str, is_package: bool) -> str | None:
    """The absolute module a ``from X import ...`` statement in module ``name`` imports from;
    None when a relative import leaves the package (or the importer is not in one)."""
    if not node.level:
        return node.module
    parts = (name if is_package else name.rpartition(".")[0]).split(".") if name else []
    if node.level - 1 >= len(parts) or not parts[0]:
        return None
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_module_arg(node: ast.Call) -> str | None:
    """``"pkg.mod"`` of ``importlib.import_module("pkg.mod")`` / ``__import__("pkg.mod")``."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value[:1] != ".":
        return arg.value
    return None


def _imported_names(source: bytes, name: str, is_package: bool, filename: str):
    """(imports, mentions) of a module's source. Imports: every dotted name it may import,
    anywhere (function bodies, ``try``, ``if TYPE_CHECKING`` included: a deferred import is code
    the stage runs); a name may be a module or an attribute (``from .x import y``), `_reached`
    keeps what is a module. Mentions: string literals that are a dotted name, such as the
    module of a ``python -m <package>.worker`` subprocess: code a stage starts, not imports;
    they count only when they name a module."""
    imports: set[str] = set()
    mentions: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, name, is_package)
            if base:
                imports.add(base)
                imports.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call) and (target := _import_module_arg(node)):
            imports.add(target)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _DOTTED.fullmatch(node.value):
                mentions.add(node.value)
    return imports, mentions


_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


def _module_imports(path: Path, name: str, is_package: bool, src_root: Path) -> frozenset[str]:
    """The dotted names one file makes Python run (see `_imported_names`; a mention only when
    it names a module under ``src_root``), parsed once per process. A file that does not parse
    names nothing here (its own bytes are still in the digest, and its stage cannot run)."""
    key = (path, name, src_root)
    if key not in _IMPORTS:
        source = path.read_bytes()
        imports, mentions = _stored_names(source, name, is_package, str(path))
        imports.update(m for m in mentions if _locate(src_root, m) is not None)
        _IMPORTS[key] = frozenset(imports)
    return _IMPORTS[key]


# Bump when `_imported_names` changes what it finds: entries of another version are not read.
_NAMES_VERSION = 1


def _stored_names(source: bytes, name: str, is_package: bool, filename: str):
    """`_imported_names` of a module, remembered across processes by its content: parsing the
    package's ~60 modules cost every Snakemake plan 0.35 s (#17). An entry is keyed by the
    sha256 of what the result depends on (the source bytes, the module's name and kind), so it
    can never be stale; one small file each under ``$LORAPIPE_CACHE/script-imports/``, written
    atomically; a missing, unreadable or unwritable cache only costs the parse."""
    ident = hashlib.sha256(
        f"{_NAMES_VERSION}\0{name}\0{int(is_package)}\0".encode() + source
    ).hexdigest()
    stored = read_cached_json("script-imports", ident)
    try:
        return set(stored["imports"]), set(stored["mentions"])
    except (KeyError, TypeError):
        pass
    try:
        imports, mentions = _imported_names(source, name, is_package, filename)
    except (SyntaxError, ValueError):  # ValueError: null bytes in the source
        return set(), set()
    write_cached_json(
        "script-imports", ident, {"imports": sorted(imports), "mentions": sorted(mentions)}
    )
    return imports, mentions


def read_cached_json(kind: str, ident: str):
    """The JSON of entry ``ident`` of cache folder ``kind`` (``$LORAPIPE_CACHE/<kind>/``, an
    entry named by the sha256 of what its value depends on); None when missing or unreadable."""
    try:
        return json.loads((cache_root() / kind / f"{ident}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_cached_json(kind: str, ident: str, value) -> None:
    """Store ``value`` as entry ``ident`` of cache folder ``kind``, atomically; a read-only or
    unusable cache only costs the next process the work again."""
    from .io import atomic_write_text

    entry = cache_root() / kind / f"{ident}.json"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(entry, json.dumps(value, allow_nan=False))
    except (OSError, ValueError):  # a read-only home must not stop a plan
        pass


def _reached(src_root: Path, dotted: str) -> list[str]:
    """The modules importing ``dotted`` runs: each prefix that is a module (``import a.b.c``
    runs ``a``, ``a.b`` and ``a.b.c``); stops at the first prefix that is not one."""
    parts, out = dotted.split("."), []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if _locate(src_root, prefix) is None:
            break
        out.append(prefix)
    return out


def script_modules(script: str | os.PathLike, package_dir: str | os.PathLike = PKG_DIR):
    """Relative paths (``lorapipe/io.py``, ``lorapipe/families/__init__.py``) of every module of
    the package at ``package_dir`` that ``script`` reaches through its imports, transitively,
    sorted. Found with `ast`, nothing is imported. The script itself is not in the list: it is
    not part of the package, and Snakemake's code trigger already reruns a job whose script
    changed."""
    script, pkg = Path(script).resolve(), Path(package_dir).resolve()
    key = (script, pkg)
    if key not in _CLOSURES:
        src_root, top = pkg.parent, pkg.name
        names = [n for n in _module_imports(script, "", False, src_root) if n.split(".")[0] == top]
        seen: set[str] = set()
        todo = [m for n in names for m in _reached(src_root, n)]
        while todo:
            mod = todo.pop()
            if mod not in seen:
                seen.add(mod)
                todo.extend(m for m in _edges(src_root, top, mod) if m not in seen)
        files = (_locate(src_root, mod)[0] for mod in seen)
        rel = (p.relative_to(src_root).as_posix() for p in files if p is not None)
        _CLOSURES[key] = tuple(sorted(rel))
    return list(_CLOSURES[key])


def _edges(src_root: Path, top: str, mod: str) -> tuple[str, ...]:
    """The package's modules that importing module ``mod`` runs directly (each import's
    `_reached`), once per process: the scripts' closures overlap, so each module's edges are
    found once for all of them, not once per script (#17: every plan computes all of them)."""
    key = (src_root, mod)
    if key not in _EDGES:
        path, is_package = _locate(src_root, mod)
        out: list[str] = []
        if path is not None:
            for n in _module_imports(path, mod, is_package, src_root):
                if n.split(".")[0] == top:
                    out.extend(_reached(src_root, n))
        _EDGES[key] = tuple(dict.fromkeys(out))
    return _EDGES[key]


def script_code(
    *scripts: str,
    scripts_dir: str | os.PathLike | None = None,
    package_dir: str | os.PathLike = PKG_DIR,
) -> str:
    """sha256 (16 hex) of the source of every package module the named scripts reach: the
    ``code`` param of the rule running ``scripts/<name>.py``, ``script_code("train")``.

    Several names give one digest over the union of their modules, less `OUTPUT_NEUTRAL`'s.
    Modules are named by their path relative to the package's parent folder, so the digest is
    the same wherever the checkout lives. ``scripts_dir`` defaults to the workflow's
    ``scripts/``.
    """
    if not scripts:
        raise ValueError("script_code: name at least one script")
    folder = Path(scripts_dir) if scripts_dir is not None else REPO_ROOT_GUESS / "scripts"
    pkg = Path(package_dir).resolve()
    modules: set[str] = set()
    for name in scripts:
        path = folder / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"script_code: no script {path}")
        modules.update(script_modules(path, pkg))
    modules -= {f"{pkg.name}/{rel}" for rel in OUTPUT_NEUTRAL}
    key = (pkg, tuple(sorted(modules)))
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for rel in key[1]:
            data = (pkg.parent / rel).read_bytes()
            h.update(f"{rel}\0{len(data)}\0".encode() + data)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


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


def cache_root() -> Path:
    """``$LORAPIPE_CACHE``, else ``$XDG_CACHE_HOME/lorapipe`` (``~/.cache/lorapipe``)."""
    return Path(
        os.environ.get("LORAPIPE_CACHE")
        or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorapipe"
        )
    )


def _hash_cache_dir() -> Path:
    return cache_root() / "sha256"


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content, remembered by (absolute path, size, mtime_ns, inode).

    Base models are gigabytes and every encode job fingerprints the VAE it uses: hashing a 4 GB
    single-file checkpoint once per shard would cost more than encoding. Entries live in
    ``$LORAPIPE_CACHE/sha256/`` (default ``~/.cache/lorapipe``), one small file each, written
    atomically, so concurrent jobs never corrupt them; a missing or unreadable cache only costs
    a re-hash. Jobs that need the same file at the same time (run_config and encode on a fresh
    base model) hash it once: the others wait for the first one's entry (`_hashing`).
    """
    from .io import atomic_write_text, sha256_file

    st = os.stat(path)
    ident = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    entry = _hash_cache_dir() / hashlib.sha256(ident.encode()).hexdigest()
    value = _cached_entry(entry)
    if value:
        return value
    with _hashing(entry):
        value = _cached_entry(entry)  # written meanwhile by the process that held the lock
        if value:
            return value
        value = sha256_file(path)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(entry, value + "\n")
        except OSError:  # a read-only home must not stop a run
            pass
    return value


def _cached_entry(entry: Path) -> str | None:
    try:
        value = entry.read_text().strip()
    except OSError:
        return None
    return value if len(value) == 64 else None


@contextlib.contextmanager
def _hashing(entry: Path):
    """Held while this process hashes the file of cache ``entry``: another process hashing the
    same file waits, then finds the entry. No lock where none can be made (a read-only cache,
    no fcntl): then each process hashes the file itself, as before."""
    try:
        import fcntl

        locks = entry.parent.with_name("sha256-locks")
        locks.mkdir(parents=True, exist_ok=True)
        fh = open(locks / entry.name, "a")  # held until the entry is written
    except (ImportError, OSError):
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


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
