"""The package's layout: imports go one way. Read from the source (ast), so the check costs milliseconds and sees
the imports hidden inside functions too.

    python -m tests.test_layout      prints the import graph by folder
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "launcher"

# What each folder may import from the rest of the package (besides itself). The training core is the top-level
# modules; `tools` may import anything, and nothing may import `tools`.
ALLOWED = {
    "launcher.checkpoint": {"launcher.errors", "launcher.files", "launcher.ranks"},
    "launcher.data": {"launcher.errors", "launcher.config"},
    "launcher.cluster": {"launcher.errors", "launcher.files", "launcher.config"},
}
# The modules at the bottom, which import nothing of the package but errors.py.
LEAVES = {"launcher.errors", "launcher.files", "launcher.ranks"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The package's modules that `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from launcher import checkpoint` and `from launcher.checkpoint import format` name modules too.
            found |= {f"{node.module}.{a.name}" for a in node.names}
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in known and name != "launcher"}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def folder(module: str) -> str:
    """The folder a module belongs to: `launcher.checkpoint.format` -> `launcher.checkpoint`; a top-level module
    (the training core) is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from where the search entered it)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


def test_no_import_cycles():
    # A package's __init__ re-exports its modules, which import each other by full name: edges from a module to
    # its own package (`launcher.checkpoint.weights` -> `launcher.checkpoint`) would make every re-export a cycle
    # without being one at import time, so they are left out; a module importing its own package is caught below.
    edges = {
        m: {d for d in deps if not (is_package(d) and m.startswith(d + "."))} for m, deps in graph().items()
    }
    assert cycles(edges) == []


def test_modules_do_not_import_their_own_package():
    bad = [(m, d) for m, deps in graph().items() for d in deps if is_package(d) and m.startswith(d + ".")]
    assert bad == []


def test_imports_go_one_way():
    problems = []
    for module, deps in graph().items():
        here = folder(module)
        for dep in deps:
            there = folder(dep)
            if there == here:
                continue
            if there == "launcher.tools":
                problems.append(f"{module} imports the tool {dep}")
            if dep == "launcher.train":
                problems.append(f"{module} imports the training loop")
            if here in ALLOWED and there not in ALLOWED[here]:
                problems.append(f"{module} ({here}) imports {dep}")
            if module in LEAVES and dep != "launcher.errors":
                problems.append(f"{module} is a leaf but imports {dep}")
    assert problems == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The reader finds what a lazy import would hide (the old checkpoint <-> state_dict cycle hid one)."""
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from launcher.checkpoint.format import verify\n    import launcher.train\n"
    )
    assert imports(source) == {"launcher.checkpoint.format", "launcher.train"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def folder_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, deps in graph().items():
        for dep in deps:
            if folder(dep) != folder(module):
                edges[folder(module)].add(folder(dep))
    return edges


if __name__ == "__main__":
    for source, targets in sorted(folder_graph().items()):
        print(f"{source} -> {', '.join(sorted(targets))}")
