"""The package's import graph: no cycles (top-level AND function-level imports), and kernel families independent."""
import ast
import functools
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "minicpm4_core"
NAME = "minicpm4_core"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__": parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict:
    "module name -> path, for every .py of the package (the generated _modidx.py included: it imports nothing)."
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, mod: str, is_pkg: bool) -> str:
    "The absolute module an ImportFrom names (relative imports resolved against `mod`)."
    if node.level == 0: return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=1)
def import_graph() -> dict:
    """module -> set of package modules it imports anywhere in its body (module level, functions, methods).

    `from pkg import name` counts as an edge to `pkg.name` when that is a module, else to `pkg`. A submodule import
    does not add an edge to its parent package: the parents here only re-export lazily (tested below)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(node, mod, path.name == "__init__.py")
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods: t = t.rpartition(".")[0]   # a.b.c where only a.b is ours
                if t and t.startswith(NAME) and t != mod: edges.add(t)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict):
    "One cycle as a list of modules, or None (iterative DFS, colours white/grey/black)."
    colour, parent = {m: 0 for m in graph}, {}
    for root in graph:
        if colour[root]: continue
        stack = [(root, iter(sorted(graph[root])))]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2; stack.pop(); continue
            if colour.get(nxt, 2) == 1:                     # back edge: a cycle
                cyc, cur = [nxt], node
                while cur != nxt: cyc.append(cur); cur = parent[cur]
                return [nxt] + cyc[1:][::-1] + [nxt]
            if colour.get(nxt) == 0:
                colour[nxt], parent[nxt] = 1, node
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_cycle_finder_finds_cycles():
    # the finder itself must be able to fail: a planted cycle, and a DAG
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_function_level_imports():
    g = import_graph()
    # model imports infllmv2 inside attention_backend only: the walk must see it
    assert "minicpm4_core.infllmv2" in g["minicpm4_core.model"]
    assert "minicpm4_core.infllmv2_ref" in g["minicpm4_core.kernels.sparse"]


def test_no_import_cycles():
    g = import_graph()
    assert len(g) > 15, sorted(g)
    cyc = find_cycle(g)
    assert cyc is None, "import cycle: " + " -> ".join(cyc)


def test_layering():
    "The attention interface sits below the model and InfLLM v2; the definitions never import the model or kernels."
    g = import_graph()
    for low in ("minicpm4_core.config", "minicpm4_core.attention", "minicpm4_core.infllmv2_ref",
                "minicpm4_core.kernels._common"):
        bad = g[low] & {"minicpm4_core.model", "minicpm4_core.infllmv2", "minicpm4_core.kernels.sparse"}
        assert not bad, f"{low} imports {bad}"
    assert "minicpm4_core.runner" not in g["minicpm4_core.train"]


def _fresh_import(stmt: str) -> list:
    code = (f"import sys; {stmt}; print([m for m in sorted(sys.modules) if m.startswith('minicpm4_core')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


def _reachable(g: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for n in g[todo.pop()] - seen: seen.add(n); todo.append(n)
    return seen


def test_kernel_families_are_independent():
    # statically: no family reaches another family or InfLLM v2 through any import, top-level or in a function
    g = import_graph()
    fams = {f"minicpm4_core.kernels.{f}" for f in ("sparse", "ternary", "w4a16")}
    for fam in fams:
        bad = _reachable(g, fam) & (fams | {"minicpm4_core.infllmv2", "minicpm4_core.model"})
        assert not bad, f"{fam} reaches {bad}"
    # and at run time (the done test): importing the ternary kernels loads neither sparse nor InfLLM v2
    loaded = _fresh_import("import minicpm4_core.kernels.ternary")
    assert "minicpm4_core.kernels.ternary" in loaded
    assert not {"minicpm4_core.infllmv2", "minicpm4_core.infllmv2_ref", "minicpm4_core.kernels.sparse"} & set(loaded)
