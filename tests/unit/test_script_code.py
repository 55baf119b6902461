"""Each rule's code param: the source of every lorapipe module its script reaches (issue #11).

What a script reaches is checked against methods that share no code with `script_modules`: the
modules Python really loads (a lower bound: deferred imports do not run), a plain-text scan for
import statements and module names (an upper bound on what source can name), and, on a synthetic
package where every deferred import can be run, exact equality with Python's own import system.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorapipe import fingerprint
from lorapipe.fingerprint import clear_code_cache, script_code, script_modules

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PKG = SRC / "lorapipe"
SCRIPTS_DIR = REPO / "scripts"
SCRIPTS = sorted(p.stem for p in SCRIPTS_DIR.glob("*.py"))


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Each test sees the source as it is now (the caches assume it never changes), with an
    empty store of parsed modules."""
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    clear_code_cache()
    yield
    clear_code_cache()


# Runs in a fresh interpreter: for each script, its own `lorapipe` import statements (the rest
# needs Snakemake's `snakemake` object, or torch), then every lorapipe module Python has loaded.
_LOADED = r"""
import ast, json, sys
from pathlib import Path
src, scripts = Path(sys.argv[1]), sys.argv[2:]
out = {}
for script in scripts:
    for name in [m for m in sys.modules if m == "lorapipe" or m.startswith("lorapipe.")]:
        del sys.modules[name]
    tree = ast.parse(Path(script).read_text())
    mine = [
        n for n in tree.body
        if (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "lorapipe")
        or (isinstance(n, ast.Import) and all(a.name.split(".")[0] == "lorapipe" for a in n.names))
    ]
    exec(compile(ast.Module(body=mine, type_ignores=[]), script, "exec"), {})
    out[script] = sorted(
        Path(m.__file__).resolve().relative_to(src).as_posix()
        for k, m in list(sys.modules.items())
        if (k == "lorapipe" or k.startswith("lorapipe.")) and getattr(m, "__file__", None)
    )
print(json.dumps(out))
"""


def _python(code: str, *args: str, path: Path) -> dict:
    """JSON printed by ``code`` run in a fresh interpreter importing from ``path`` only."""
    env = {"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_closure_holds_every_module_python_loads_for_each_script():
    loaded = _python(_LOADED, str(SRC), *(str(SCRIPTS_DIR / f"{s}.py") for s in SCRIPTS), path=SRC)
    for name in SCRIPTS:
        found = set(script_modules(SCRIPTS_DIR / f"{name}.py"))
        really = set(loaded[str(SCRIPTS_DIR / f"{name}.py")])
        assert really, name  # every shipped script imports lorapipe
        assert really <= found, f"{name}: imported but not fingerprinted: {really - found}"


# Import statements as text: ``from <dots><module> import <names>`` and ``import <names>``.
_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*)([\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)", re.M)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([^\n#;]+)", re.M)
# A dotted lorapipe name as a whole string literal: `python -m lorapipe.x`, import_module(...).
_LITERAL = re.compile(r"""["'](lorapipe(?:\.\w+)+)["']""")


def _module_file(dotted: str) -> list[str]:
    """Source files (relative to src/) Python runs to import ``dotted``, if it is a module."""
    out, parts = [], dotted.split(".")
    for i in range(1, len(parts) + 1):
        base = SRC.joinpath(*parts[:i])
        for cand in (base / "__init__.py", base.with_name(base.name + ".py")):
            if cand.is_file():
                out.append(cand.relative_to(SRC).as_posix())
                break
        else:
            if not base.is_dir():
                break
    return out


def _named_in(rel: str | None, text: str) -> set[str]:
    """lorapipe module files a source text names in import statements or as module strings."""
    package = []
    if rel is not None:
        parts = rel[: -len(".py")].split("/")
        package = parts[:-1]
    names = set(_LITERAL.findall(text))
    for dots, module, what in _FROM.findall(text):
        if dots:
            if not package or len(dots) - 1 >= len(package):
                continue
            base = ".".join(package[: len(package) - len(dots) + 1] + ([module] if module else []))
        else:
            base = module
        names.add(base)
        for item in what.strip("() \n").split(","):
            if item.strip():
                names.add(f"{base}.{item.split()[0]}")
    for what in _IMPORT.findall(text):
        names.update(item.split()[0] for item in what.split(",") if item.strip())
    return {f for n in names if n.split(".")[0] == "lorapipe" for f in _module_file(n)}


@pytest.mark.parametrize("name", SCRIPTS)
def test_closure_holds_every_module_its_modules_name(name):
    """Text scan of the script and of every module reached: nothing they name is left out."""
    found = set(script_modules(SCRIPTS_DIR / f"{name}.py"))
    named = _named_in(None, (SCRIPTS_DIR / f"{name}.py").read_text())
    for rel in found:
        named |= _named_in(rel, (SRC / rel).read_text())
    assert found, name
    assert named <= found, f"{name}: named but not fingerprinted: {named - found}"


_FAKE = {
    "fakepkg/__init__.py": "",
    "fakepkg/a.py": """
        from . import b

        def load():
            from .c import thing  # deferred: runs only when the stage calls it
        """,
    "fakepkg/b.py": "import fakepkg.sub.deep\n",
    "fakepkg/c.py": """
        thing = 1
        try:
            from .h import nothing
        except ImportError:
            pass
        """,
    "fakepkg/h.py": "",
    "fakepkg/sub/__init__.py": "from .inner import X\nfrom . import sib\n",
    "fakepkg/sub/sib.py": "",
    "fakepkg/sub/inner.py": "from ..d import y\nX = 1\n",
    "fakepkg/sub/deep.py": """
        from .. import e

        def load():
            import importlib
            importlib.import_module("fakepkg.f")
        """,
    "fakepkg/d.py": "y = 2\n",
    "fakepkg/e.py": """
        from fakepkg.sub import X  # an attribute of the package, not a module

        class K:
            def load(self):
                from fakepkg import g
        def load():
            K().load()
        """,
    "fakepkg/f.py": """
        # started, not imported: a subprocess runs it (Python's oracle cannot see it)
        CMD = ["python", "-m", "fakepkg.runner"]
        TAG = "fakepkg.not_a_module"
        """,
    "fakepkg/runner.py": "",
    "fakepkg/g.py": "from fakepkg.ns import mod\n",
    "fakepkg/ns/mod.py": "from ..other import *\n",  # ns/ has no __init__.py: a namespace
    "fakepkg/other.py": "",
    "fakepkg/unused.py": "import fakepkg.a\n",
    "fakepkg/sub/unused.py": "",
    "scripts/stage.py": "import os\nfrom fakepkg import a\n",
}

# Python's answer: run the script, then call every `load()` of the loaded modules until no new
# module appears (each deferred import of the synthetic package sits in one).
_ORACLE = r"""
import json, runpy, sys
from pathlib import Path
root = Path(sys.argv[1])
runpy.run_path(sys.argv[2])
called = set()
while True:
    mods = {k: m for k, m in list(sys.modules.items()) if k.split(".")[0] == "fakepkg"}
    todo = [k for k, m in mods.items() if k not in called and hasattr(m, "load")]
    if not todo:
        break
    for k in todo:
        called.add(k)
        mods[k].load()
print(json.dumps(sorted(
    Path(m.__file__).relative_to(root).as_posix() for m in mods.values() if m.__file__
)))
"""


def _write_tree(root: Path, files: dict[str, str]) -> None:
    """Write ``{relative path: text}`` under ``root`` (texts dedented)."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))


def test_every_import_form_matches_python_on_a_synthetic_package(tmp_path):
    """Absolute, from-package, relative (one and two levels, in a package __init__ and in a
    submodule), deferred in functions and methods, try/except, importlib with a literal,
    package __init__ of a submodule, namespace subpackage, star import: exactly what runs, plus
    a module a subprocess is started as."""
    _write_tree(tmp_path, _FAKE)
    really = _python(_ORACLE, str(tmp_path), str(tmp_path / "scripts/stage.py"), path=tmp_path)
    found = script_modules(tmp_path / "scripts/stage.py", tmp_path / "fakepkg")
    assert [m for m in found if m != "fakepkg/runner.py"] == really
    assert "fakepkg/runner.py" in found  # named as a module in a string: `python -m`
    assert "fakepkg/unused.py" not in found and "fakepkg/sub/unused.py" not in found
    assert "fakepkg/c.py" in found  # a deferred import only (Python loaded it via load())


def test_script_code_follows_the_closure_and_names_files_relatively(tmp_path):
    _write_tree(tmp_path / "one", _FAKE)
    _write_tree(tmp_path / "elsewhere" / "two", _FAKE)
    one = {"scripts_dir": tmp_path / "one/scripts", "package_dir": tmp_path / "one/fakepkg"}
    two = {
        "scripts_dir": tmp_path / "elsewhere/two/scripts",
        "package_dir": tmp_path / "elsewhere/two/fakepkg",
    }
    assert script_code("stage", **one) == script_code("stage", **two)  # location-free
    before = script_code("stage", **one)
    with open(tmp_path / "one/fakepkg/sub/unused.py", "a") as fh:
        fh.write("# not reached\n")
    clear_code_cache()
    assert script_code("stage", **one) == before
    with open(tmp_path / "one/fakepkg/ns/mod.py", "a") as fh:
        fh.write("# reached through a namespace subpackage\n")
    clear_code_cache()
    assert script_code("stage", **one) != before
    with pytest.raises(FileNotFoundError, match="nosuch"):
        script_code("nosuch", **one)


def _copy_package(dest: Path) -> Path:
    """A private copy of src/lorapipe under ``dest``, for tests that edit it."""
    shutil.copytree(PKG, dest / "lorapipe", ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "lorapipe"


def test_editing_a_module_restales_exactly_the_stages_that_reach_it(tmp_path):
    """Every module of a copy of the package, edited in turn: a stage's code param changes iff
    its script reaches the module, and for no stage when the module is output-neutral."""
    pkg = _copy_package(tmp_path)

    def codes() -> dict[str, str]:
        """Every shipped script's code param, computed afresh from the copy."""
        clear_code_cache()
        return {s: script_code(s, scripts_dir=SCRIPTS_DIR, package_dir=pkg) for s in SCRIPTS}

    reach = {s: set(script_modules(SCRIPTS_DIR / f"{s}.py", pkg)) for s in SCRIPTS}
    base = codes()
    unchanged_seen = neutral_seen = 0
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(tmp_path).as_posix()
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        try:
            now = codes()
        finally:
            path.write_bytes(original)
        changed = {s for s in SCRIPTS if now[s] != base[s]}
        if path.relative_to(pkg).as_posix() in fingerprint.OUTPUT_NEUTRAL:
            assert changed == set(), rel  # where a job runs, how it is timed: no restale
            neutral_seen += 1
        else:
            assert changed == {s for s in SCRIPTS if rel in reach[s]}, rel
        unchanged_seen += len(SCRIPTS) - len(changed)
    assert unchanged_seen  # some edit left some stage fresh
    assert neutral_seen == len(fingerprint.OUTPUT_NEUTRAL)
    assert codes() == base


def test_output_neutral_modules_are_reached_and_import_only_each_other():
    """Each module left out of the code params exists and is reached by a stage (no stale
    entry), and imports no package module but the other neutral ones, so nothing that shapes
    an output can sit behind it (what it imports is digested anyway)."""
    neutral = {f"lorapipe/{rel}" for rel in fingerprint.OUTPUT_NEUTRAL}
    reached = {m for s in SCRIPTS for m in script_modules(SCRIPTS_DIR / f"{s}.py")}
    assert neutral <= reached
    for rel in sorted(neutral):
        named = _named_in(rel, (SRC / rel).read_text()) - {"lorapipe/__init__.py"}
        assert named <= neutral, f"{rel} imports {named - neutral}"


def test_editing_fingerprint_restales_run_config(tmp_path):
    """The issue: run_config calls fingerprint (through runs) but its hand list omitted it."""
    pkg = _copy_package(tmp_path)
    kw = {"scripts_dir": SCRIPTS_DIR, "package_dir": pkg}
    before = script_code("run_config", "train", **kw)
    with open(pkg / "fingerprint.py", "a") as fh:
        fh.write("# an edit\n")
    clear_code_cache()
    assert script_code("run_config", "train", **kw) != before


def test_each_module_is_parsed_once_per_process(monkeypatch):
    """Every rule of a plan calls script_code; a module shared by many is read once."""
    calls = []
    real = fingerprint.ast.parse
    monkeypatch.setattr(fingerprint.ast, "parse", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = {s: script_code(s) for s in SCRIPTS}
    modules = {m for s in SCRIPTS for m in script_modules(SCRIPTS_DIR / f"{s}.py")}
    assert len(calls) == len(modules) + len(SCRIPTS)
    assert {s: script_code(s) for s in SCRIPTS} == first
    assert len(calls) == len(modules) + len(SCRIPTS)  # the second plan read nothing


def test_a_later_process_reads_the_parsed_modules_from_the_cache(tmp_path, monkeypatch):
    """Parsing the package cost every Snakemake plan ~0.35 s (#17): what a module imports is
    stored under $LORAPIPE_CACHE by the module's content, and the next process (here: a cleared
    in-process cache) parses nothing and finds the same digests."""
    first = {s: script_code(s) for s in SCRIPTS}
    stored = list((tmp_path / "cache" / "script-imports").glob("*.json"))
    assert len(stored) >= len({m for s in SCRIPTS for m in script_modules(SCRIPTS_DIR / f"{s}.py")})
    clear_code_cache()
    calls = []
    real = fingerprint.ast.parse
    monkeypatch.setattr(fingerprint.ast, "parse", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert {s: script_code(s) for s in SCRIPTS} == first
    assert calls == []


def test_the_cache_follows_the_content_and_survives_a_bad_entry(tmp_path, monkeypatch):
    """An entry is keyed by the module's bytes: an edited module is parsed again and its new
    import counts; a corrupt entry is parsed again too, and an unwritable cache only costs the
    parse."""
    pkg = tmp_path / "pkg" / "demo"
    scripts = tmp_path / "scripts"
    pkg.mkdir(parents=True)
    scripts.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("X = 1\n")
    (pkg / "b.py").write_text("Y = 2\n")
    (scripts / "s.py").write_text("import demo.a\n")
    assert script_modules(scripts / "s.py", pkg) == ["demo/__init__.py", "demo/a.py"]
    (pkg / "a.py").write_text("from . import b\n")
    clear_code_cache()
    assert script_modules(scripts / "s.py", pkg) == [
        "demo/__init__.py", "demo/a.py", "demo/b.py"
    ]
    for entry in (tmp_path / "cache" / "script-imports").glob("*.json"):
        entry.write_text('{"imports": 3')
    clear_code_cache()
    assert len(script_modules(scripts / "s.py", pkg)) == 3
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "scripts" / "s.py"))  # not a folder
    clear_code_cache()
    assert len(script_modules(scripts / "s.py", pkg)) == 3


_RULE = re.compile(r"^\s*rule\b", re.M)
_SCRIPT = re.compile(r"^\s*script:\s*\n\s*\"\.\./scripts/(\w+)\.py\"", re.M)
_CODE = re.compile(r"^\s*code=(\w+)\(([^)]*)\)", re.M)


def test_every_rule_with_a_script_fingerprints_that_script():
    """No rule can drift back to a hand list, nor name another rule's script first."""
    checked = 0
    for smk in sorted((REPO / "rules").glob("*.smk")):
        assert "code_version(" not in smk.read_text(), smk.name
        for block in _RULE.split(smk.read_text())[1:]:
            script = _SCRIPT.search(block)
            if not script:
                continue
            code = _CODE.search(block)
            assert code, f"{smk.name}: rule running {script[1]}.py has no code param"
            args = [a.strip().strip("\"'") for a in code[2].split(",") if a.strip()]
            assert code[1] == "script_code" and args[0] == script[1], (smk.name, code[0])
            checked += 1
    assert checked >= len(SCRIPTS)
