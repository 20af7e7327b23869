"""The package's import graph, read from its source: imports flow one way between rooms, there are no
import cycles, and package modules are imported at module level (a function-level import hides a cycle
or a backward import). See docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgeinspect"

# The rooms, lowest first: a module may import its own room and the rooms before it, never one after it.
# The package root (`edgeinspect/__init__.py`: the version) may be imported by every room; `cli.py` is the
# top and is imported by none.
ROOM_ORDER = ("config", "core", "data", "models", "runtime", "calibration", "training", "export", "evaluation",
              "generation")
TOP = "cli"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(name: str, path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) for every import of a package module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = {id(c) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for c in ast.walk(f) if c is not f}
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        resolved = set()
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                resolved.add(t)
        found += [(t, node.lineno, id(node) in in_function) for t in sorted(resolved)]
    return found


Graph = dict[str, list[tuple[str, int, bool]]]


def import_graph(package: Path = PACKAGE) -> Graph:
    """Every module of `package` with the package modules it imports."""
    paths = {_module_name(p, package.parent): p for p in package.rglob("*.py")}
    return {m: _imports(m, p, set(paths)) for m, p in paths.items()}


def _room(module: str) -> str | None:
    """The room of a package module: its first-level subpackage, or the root module's name (cli);
    None for the package root itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def backward_imports(graph: Graph) -> list[str]:
    out = []
    for module, imports in graph.items():
        src = _room(module)
        for target, line, _ in imports:
            dst = _room(target)
            if dst is None or dst == src or src == TOP:
                continue
            if dst == TOP or src is None or ROOM_ORDER.index(dst) > ROOM_ORDER.index(src):
                out.append(f"{module}:{line} imports {target} ({src} -> {dst})")
    return out


def import_cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan); a package importing its own
    submodules is not a cycle."""
    edges = {m: {t for t, _, _ in imps if not t.startswith(m + ".")} for m, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def function_level_imports(graph: Graph) -> list[str]:
    return [f"{m}:{line} imports {t}" for m, imps in graph.items() for t, line, inside in imps if inside]


def test_every_module_is_in_a_room():
    rooms = {_room(m) for m in import_graph()} - {None}
    assert rooms <= set(ROOM_ORDER) | {TOP}, f"modules outside the rooms {ROOM_ORDER}: {sorted(rooms - set(ROOM_ORDER))}"


def test_rooms_import_one_way():
    backward = backward_imports(import_graph())
    assert not backward, "imports against the room order " + " < ".join(ROOM_ORDER) + ":\n" + "\n".join(backward)


def test_no_import_cycles():
    assert not import_cycles(import_graph())


def test_package_modules_are_imported_at_module_level():
    lazy = function_level_imports(import_graph())
    assert not lazy, "package modules imported inside functions:\n" + "\n".join(lazy)


def test_the_checks_find_a_backward_import_a_cycle_and_a_function_level_import(tmp_path):
    pkg = tmp_path / "edgeinspect"
    for rel, text in {"__init__.py": "", "core/__init__.py": "", "core/a.py": "from edgeinspect.runtime import b\n",
                      "runtime/__init__.py": "", "runtime/b.py": "def f():\n    from edgeinspect.core import a\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert backward_imports(graph) == ["edgeinspect.core.a:1 imports edgeinspect.runtime (core -> runtime)",
                                       "edgeinspect.core.a:1 imports edgeinspect.runtime.b (core -> runtime)"]
    assert import_cycles(graph) == [["edgeinspect.core.a", "edgeinspect.runtime.b"]]
    assert function_level_imports(graph) == ["edgeinspect.runtime.b:2 imports edgeinspect.core",
                                             "edgeinspect.runtime.b:2 imports edgeinspect.core.a"]
