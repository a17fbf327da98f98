"""No import circles: no file of the project imports, directly or through others, a file that
imports it back, and the layering of DESIGN.md holds (../shared/tools/check_layers.py).

The graph is read from the source (ast), not from what happens to be imported at run time, so an
import inside a function or under TYPE_CHECKING counts as much as one at the top: a lazy import
only hides a circle until someone moves it. `from pkg import name` is an edge to pkg/name.py when
that file exists, else to pkg/__init__.py; a package's __init__ is not implied by importing one of
its modules (every `import pkg.mod` runs pkg/__init__.py, and an __init__ that re-exports its
modules would otherwise make every package a circle).
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("train.py", "recipes", "rl", "sft", "evaluation", "serve", "sampling", "model", "kernels", "envs",
            "verify", "data", "runtime")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path, tops=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules its source imports anywhere (see the module docstring)."""
    files = []
    for top in tops:
        p = root / top
        files += [p] if p.is_file() else sorted(p.rglob("*.py")) if p.is_dir() else []
    modules = {_module_name(f, root): f for f in files}
    graph = {}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), filename=str(f))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # relative: from . import x, from ..pkg import y
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                    base = ".".join([*anchor, *([base] if base else [])])
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    if sub in modules:
                        edges.add(sub)
                    elif base in modules:
                        edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_file_imports_a_file_that_imports_it_back():
    graph = import_graph(ROOT)
    assert len(graph) > 60 and "recipes.stages" in graph["train"] and "model.block" in graph["model.mtp"]
    found = circles(graph)
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_circle_finder_finds_circles_through_lazy_relative_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n    return b\n")           # lazy
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n")
    (pkg / "c.py").write_text("from .a import f\n")                                        # relative
    (pkg / "d.py").write_text("import pkg.a\n")                                            # no circle
    graph = import_graph(tmp_path, tops=("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_layering_check_is_clean():
    script = ROOT.parent / "shared" / "tools" / "check_layers.py"
    if not script.is_file():
        pytest.skip(f"the layering check is not beside this checkout ({script})")
    p = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "0 violations" in p.stdout, p.stdout + p.stderr
