"""The layering of ARCHITECTURE.md holds: imports point only down, no circles, no imports hidden in functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sparsec"


def layer_ranks() -> dict[str, int]:
    """Module or package name -> rank, from the table in ARCHITECTURE.md."""
    ranks = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|(.*?)\|", line)
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                ranks[name] = int(m.group(1))
    return ranks


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank_of(module: str, ranks: dict[str, int]) -> int:
    """The rank of the longest table entry that is ``module`` or a package above it."""
    name = module
    while name not in ranks:
        assert "." in name, f"{module} is in no row of ARCHITECTURE.md"
        name = name.rsplit(".", 1)[0]
    return ranks[name]


def sparsec_imports(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """(sparsec modules imported at module level, (line, text) of imports made inside a function)."""
    tree = ast.parse(path.read_text())
    top, nested = [], []
    lines = path.read_text().splitlines()

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("sparsec"):
                    # "from sparsec import config" names a module; "from sparsec.x import f" a member
                    names = [f"{child.module}.{a.name}" for a in child.names]
                if in_function:
                    nested.append((child.lineno, lines[child.lineno - 1].strip()))
                else:
                    top.extend(n for n in names if n == "sparsec" or n.startswith("sparsec."))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, nested


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported name lives in (``sparsec.spec.Spec`` -> ``sparsec.spec``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for imported in sparsec_imports(path)[0]:
            target = _resolve(imported, modules)
            if target and target != name:
                graph.add_edge(name, target)
    return graph


def test_every_module_has_a_row():
    ranks = layer_ranks()
    for name in _modules():
        rank_of(name, ranks)


def test_imports_only_point_down_the_layers():
    ranks = layer_ranks()
    upward = [
        f"{a} (rank {rank_of(a, ranks)}) imports {b} (rank {rank_of(b, ranks)})"
        for a, b in import_graph().edges
        if rank_of(b, ranks) > rank_of(a, ranks) and a != "sparsec" and not b.startswith(a + ".")
    ]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = import_graph()
    # a package's __init__ re-exporting its own modules is not a circle of the design
    graph.remove_edges_from([(a, b) for a, b in list(graph.edges) if b.startswith(a + ".") or a.startswith(b + ".")])
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import circles: {cycles[:5]}"


def test_imports_inside_functions_are_only_commented_lazy_triton_imports():
    bad = []
    for name, path in _modules().items():
        for line, text in sparsec_imports(path)[1]:
            if not (re.match(r"(import|from) triton\b", text) and "#" in text):
                bad.append(f"{name}:{line}: {text}")
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    """The rank lookup and the AST walk catch what they should (guards against a vacuous pass)."""
    ranks = layer_ranks()
    assert rank_of("sparsec.nn.layers", ranks) > rank_of("sparsec.runtime.ops", ranks)
    assert rank_of("sparsec.spec.policy", ranks) < rank_of("sparsec.policies.base", ranks)
    fake = tmp_path / "m.py"
    fake.write_text("import torch\nfrom sparsec.nn import layers\n\ndef f():\n    from sparsec.train import updater\n")
    top, nested = sparsec_imports(fake)
    assert "sparsec.nn.layers" in top and nested == [(5, "from sparsec.train import updater")]
