"""The library's layers import one way: shards (converters) -> data -> models -> losses -> train,
and eval reads models and data. Read from the source (every import, deferred ones included), so a
new import against the flow fails here before it becomes a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "carl_scale"

# what each layer may import besides itself; the top-level modules (configs, tables, the hook
# interface between training and its callers, entry-point errors, durable renames) are open to all
ALLOWED = {
    "data": set(),
    "datasets": {"data"},
    "models": set(),
    "ops": set(),
    "losses": {"data", "models", "ops"},
    "train": {"data", "models", "losses"},
    "eval": {"data", "models", "ops"},
}
SHARED = {"config", "tables", "hooks", "errors", "durable"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("carl_scale"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("carl_scale")}
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_layers_import_one_way():
    bad = []
    for mod, deps in _graph().items():
        layer = mod.split(".")[1] if mod.count(".") else None
        if layer not in ALLOWED:
            continue  # bench, cli, the shared helpers: callers of everything
        for dep in deps:
            target = dep.split(".")[1] if dep.count(".") else None
            if target not in {layer, *ALLOWED[layer], *SHARED}:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d in graph and not state.get(d):
                cycle = visit(d)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if not state.get(m):
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_the_readme_layout_table_names_every_package():
    readme = (ROOT / "README.md").read_text()
    for pkg in sorted(p.parent.name for p in PKG.glob("*/__init__.py")):
        assert f"`carl_scale/{pkg}/`" in readme, pkg
