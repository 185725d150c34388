"""The package's import structure (issue 9): no cycle between megatron_ling's packages or
modules, the pipeline package is pure, and no library module imports test code. Parsed with ast
over every file, so function-level (lazy) imports count too."""
from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_ling")


def _modules() -> dict:
    """module name -> set of imported megatron_ling module names (every import statement)."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            name = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
            deps = set()
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    deps.add(node.module)
                    deps |= {f"{node.module}.{a.name}" for a in node.names}
            out[name] = deps
    return out


def _package(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else mod


def _cycle(graph: dict):
    """One cycle of ``graph`` (node -> set of nodes) as a list, or None."""
    state: dict = {}
    stack: list = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycle_between_modules_or_packages():
    mods = _modules()
    # a package's __init__ re-exporting its own submodules is not a cycle
    files = {m: {d for d in deps if d in mods and d != m and not d.startswith(m + ".")} for m, deps in mods.items()}
    assert _cycle(files) is None, f"module import cycle: {_cycle(files)}"
    pkgs: dict = {}
    for m, deps in files.items():
        pkgs.setdefault(_package(m), set()).update(_package(d) for d in deps if _package(d) != _package(m))
    assert _cycle(pkgs) is None, f"package import cycle: {_cycle(pkgs)}"


def test_pipeline_package_imports_nothing_from_training_or_profiling():
    mods = _modules()
    bad = {m: sorted(d for d in deps if _package(d) in ("megatron_ling.training", "megatron_ling.profiling"))
           for m, deps in mods.items() if _package(m) == "megatron_ling.pipeline"}
    assert all(not v for v in bad.values()), bad
    assert "megatron_ling.pipeline.profile" in mods and "megatron_ling.pipeline.timeline" in mods


def test_no_library_module_imports_test_code():
    bad = {m: sorted(d for d in deps if d == "tests" or d.startswith("tests."))
           for m, deps in _modules().items()}
    assert all(not v for v in bad.values()), {k: v for k, v in bad.items() if v}
