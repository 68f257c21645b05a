"""The package's shape, as DESIGN.md states it: data flows one way, so the import graph of
`phased_jax` and `phased_tools` has no cycle; the model imports nothing from decoding,
training or data; no module imports another's private name; imports sit at module level."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"phased_jax": REPO / "phased_jax", "phased_tools": REPO / "tools" / "phased_tools"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path, tree: ast.Module | None = None) -> list[tuple[ast.AST, str, list[str]]]:
    """(node, imported module, names) for each import of ours in the file."""
    found = []
    for node in ast.walk(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in ROOTS:
                found.append((node, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node, a.name, []) for a in node.names if a.name.split(".")[0] in ROOTS]
    return found


def _targets(module: str, names: list[str]) -> list[str]:
    """The modules an import loads: `from pkg import mod` names a submodule."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs or ([module] if module in MODULES else [])


def test_no_import_cycle():
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for _, module, names in _imports(path):
            graph[m].update(t for t in _targets(module, names) if t != m)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_model_imports_nothing_from_decoding_training_or_data():
    banned = ("phased_jax.generate", "phased_jax.train", "phased_jax.data")
    bad = [(m, module) for m, path in MODULES.items() if m.startswith("phased_jax.model")
           for _, module, _ in _imports(path) if module.startswith(banned)]
    assert not bad


def test_no_private_names_imported_and_no_imports_inside_functions():
    private, nested = [], []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node, module, names in _imports(path, tree):
            private += [f"{m}: {module}.{n}" for n in names if n.startswith("_")]
            if id(node) not in top:
                nested.append(f"{m}:{node.lineno}: import of {module} inside a function")
    assert not private
    assert not nested
