"""The package layering, read from the source (every import, at module level or inside a function):

    core      imports neither compiler, runtime nor tune, and no JAX, Flax, optax, Hydra or OmegaConf
    compiler  imports core; never runtime or tune, never JAX, Flax or optax
    runtime   imports core; never compiler or tune, never Hydra or OmegaConf
    tune      the command line: may import all three

and no module imports another that imports it back, directly or around a loop."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "compiler", "runtime", "tune")
FORBIDDEN = {
    "core": {"compiler", "runtime", "tune", "jax", "jaxlib", "flax", "optax", "hydra", "omegaconf"},
    "compiler": {"runtime", "tune", "jax", "jaxlib", "flax", "optax"},
    "runtime": {"compiler", "tune", "hydra", "omegaconf"},
    "tune": set(),
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement in the file, however deep."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_it_may(package):
    bad = []
    for name, path in modules().items():
        if name.split(".")[0] != package:
            continue
        for target, line in imports(path):
            if target.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {t for t, _ in imports(path) if t in mods and t != name}
            for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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


def test_no_import_loops():
    assert cycles(graph()) == []


def test_the_loop_finder_finds_loops():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from compiler import schema\n    import jax.numpy\n")
    assert {t for t, _ in imports(f)} == {"compiler", "compiler.schema", "jax.numpy"}
