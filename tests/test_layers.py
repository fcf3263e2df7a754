"""The package's layering, read from the source: no import cycle (static, inside functions, or through module-path
strings such as importlib or `python -m` arguments) and no import from a lower layer to a higher one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "effai"

# Lower number = lower layer; a module may import its own layer or lower ones. Data flows up this list.
LAYERS = {
    "errors": 0, "version": 0, "registry": 0, "files": 0, "console": 0, "toolchain": 0,
    "data": 1,
    "zoo": 2,
    "export": 3,
    "train": 4, "device_bench": 4,
    "bundle": 5, "devit_runtime": 5, "generate": 5, "collab": 5, "rl": 4, "superres": 5,
    "cli": 6, "api": 6, "__main__": 6, "__init__": 6,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        if "_vendor" in p.parts:
            continue
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    if "._vendor" in name:           # vendored generated code: a leaf that imports nothing of effai
        return None
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        src = path.read_text()
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(src)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                # `from effai.zoo import build`: the submodule when one has that name, else the package itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                r = _resolve(t, mods) if t.startswith("effai") else None
                if r and r != m:
                    edges[m].add(r)
        # module paths in strings (importlib, `python -m`): only full paths of a module file, not package names
        # (which double as metadata keys such as "effai.train")
        for s in re.findall(r"[\"'](effai(?:\.\w+)+)[\"']", src):
            if s in mods and mods[s].name != "__init__.py" and s != m:
                edges[m].add(s)
    return edges


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_every_module_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in _modules() if "." in m} - set(LAYERS))
    assert not unknown, f"add these packages/modules to LAYERS: {unknown}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    mods = _modules()
    upward = sorted(f"{a} -> {b}" for a, bs in _edges(mods).items() for b in bs if _layer(a) < _layer(b))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = _edges(_modules())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:           # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles
