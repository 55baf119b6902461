"""The package has no import cycle: every import statement of src/lorapipe, deferred ones in
function bodies included, read with ast (an import deferred to hide a cycle is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "src" / "lorapipe"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def exists(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The lorapipe modules one file imports (a name imported from a package counts as the
    submodule when there is one, else as the package)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lorapipe"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lorapipe":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if exists(sub) else target)
    return {m for m in out if exists(m) and m != me}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_deferred_and_relative_imports():
    g = graph()
    assert "lorapipe.worker" in g and "lorapipe.train" in g["lorapipe.worker"]  # deferred
    assert "lorapipe.training.batches" in g["lorapipe.train"]  # relative, from a subpackage
    assert "lorapipe.io" in g["lorapipe.training.checkpoints"]  # two dots up
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    assert cycles(graph()) == []


def test_distributed_is_a_leaf():
    """Processes and collectives only: it imports no other lorapipe module (the worker entry
    point, which trains, is lorapipe.worker)."""
    assert graph()["lorapipe.distributed"] == set()


SCRIPTS = PKG.parents[1] / "scripts"
# The stages that load no model (#17): importing what their script imports pulls in neither
# torch nor diffusers (~3 s and ~4 s a process here); the rest import torch, never at planning.
LIGHT = ("best", "caption", "captions_review", "demo_data", "manifest",
         "merge_manifest", "run_config", "shard", "sweep_table", "tiny_model", "track")  # fmt: skip


def script_imports(name: str) -> str:
    """The import statements of scripts/<name>.py, as one line of Python."""
    tree = ast.parse((SCRIPTS / f"{name}.py").read_bytes())
    nodes = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return "; ".join(ast.unparse(n) for n in nodes)


def test_light_stage_scripts_import_no_torch_or_diffusers():
    import json
    import subprocess
    import sys

    assert set(LIGHT) < {p.stem for p in SCRIPTS.glob("*.py")}
    for name in LIGHT:
        prog = (f"{script_imports(name)}; import sys, json; "
                "print(json.dumps([m for m in ('torch', 'diffusers', 'transformers', 'peft') "
                "if m in sys.modules]))")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True)
        assert out.returncode == 0, (name, out.stderr[-2000:])
        assert json.loads(out.stdout) == [], f"scripts/{name}.py imports {out.stdout.strip()}"


def test_the_plan_imports_no_numeric_library():
    """Every Snakemake invocation (and cluster job) parses the Snakefile: the lorapipe modules
    the rules import, and what they call while planning, load none of torch, diffusers,
    transformers, peft, mlflow or numpy (#17: each costs 0.06-7 s of every plan)."""
    import re
    import subprocess
    import sys

    rules = PKG.parents[1] / "rules"
    mods = set()
    for smk in [*rules.glob("*.smk"), PKG.parents[1] / "Snakefile"]:
        for mod, name in re.findall(r"^\s*from (lorapipe[\w.]*) import (\w+)", smk.read_text(),
                                    re.M):  # fmt: skip
            mods.add(f"lorapipe.{name}" if mod == "lorapipe" else mod)
    assert {"lorapipe.planning", "lorapipe.config", "lorapipe.warm"} <= mods, mods
    code = (
        "import sys, importlib\n"
        f"for m in {sorted(mods)!r}: importlib.import_module(m)\n"
        "from lorapipe.images import pil_identity; pil_identity()\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'mlflow', 'numpy')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(PKG.parent), "PATH": "/usr/bin:/bin"},
                         check=True)  # fmt: skip
    assert out.stdout.strip() == "", f"the plan imports {out.stdout.strip()}"
