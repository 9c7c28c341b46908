"""Issue 10: the package's import graph has no circle (imports anywhere in a file count, lazy ones included), and
the inference modules never import the training or evaluation packages."""
from __future__ import annotations

import ast
from pathlib import Path

import pneumoct

ROOT = Path(pneumoct.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom):
                base = ".".join(pkg[: len(pkg) - (n.level - 1)] + ([n.module] if n.module else [])) if n.level \
                    else (n.module or "")
                for a in n.names:
                    full = f"{base}.{a.name}"
                    edges[m].add(full if full in mods else base)
            elif isinstance(n, ast.Import):
                edges[m].update(a.name for a in n.names)
        edges[m] &= set(mods)
        edges[m].discard(m)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    edges = _edges(_modules())
    assert "pneumoct.train.loop" in edges and edges["pneumoct.pipeline"], "the graph was read"
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_inference_modules_do_not_import_training_code():
    edges = _edges(_modules())
    inference = [m for m in edges if not m.startswith(("pneumoct.train", "pneumoct.evaluate", "pneumoct.cli"))
                 and m not in ("pneumoct.fingerprint",)]  # the fingerprint builder also serves training runs
    for m in inference:
        bad = sorted(e for e in edges[m] if e.startswith(("pneumoct.train", "pneumoct.evaluate")))
        assert not bad, f"{m} imports {bad}"
