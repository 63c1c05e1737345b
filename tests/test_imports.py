"""The repository's import graph has no circle: every import of one of our modules by another, at any depth in the
file (a function-level import hides a circle from Python, not from the reader), is an edge."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medcot", "bench", "jobs")


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file: the packages' modules, and the tests' (imported by name, from tests/)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    for path in sorted((root / "tests").glob("*.py")):
        found[path.stem] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that `name` imports anywhere in its file."""
    package = name.rpartition(".")[0] if path.stem != "__init__" else name
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from package import module` imports the module; `from module import name`, the module
            out.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {m for m in out if m in known and m != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imported(name, path, known) for name, path in known.items()}


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def test_every_form_of_import_is_an_edge_and_a_circle_through_a_function_is_found(tmp_path):
    files = {
        "medcot/__init__.py": "",
        "medcot/a.py": "from medcot.b import f\n",
        "medcot/b.py": "def f():\n    from . import c\n",
        "medcot/c.py": "import medcot.d\nfrom .e import g\n",
        "medcot/d.py": "", "medcot/e.py": "from medcot import a\n",
        "bench/__init__.py": "", "bench/x.py": "from medcot.d import *\nimport json\n",
        "jobs/y.py": "from medcot import d, x_not_a_module\n",
        "tests/test_z.py": "def test():\n    import test_w\n", "tests/test_w.py": "import pytest\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["medcot.a"] == {"medcot.b"} and graph["medcot.b"] == {"medcot.c"}
    assert graph["medcot.c"] == {"medcot.d", "medcot.e"} and graph["medcot.e"] == {"medcot.a"}
    assert graph["bench.x"] == {"medcot.d"} and graph["jobs.y"] == {"medcot.d", "medcot"}
    assert graph["test_z"] == {"test_w"}
    assert set(circle(graph)) == {"medcot.a", "medcot.b", "medcot.c", "medcot.e"}
    (tmp_path / "medcot/e.py").write_text("")
    assert circle(import_graph(tmp_path)) is None


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert sum(map(len, graph.values())) > 100 and graph["jobs.train"], "the graph lost its edges"
    found = circle(graph)
    assert found is None, (f"an import circle: {' -> '.join(found)}; move the shared code to the module it belongs "
                           "to (a function-level import does not break a circle)")
