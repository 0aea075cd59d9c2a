"""IR nodes and programs: frozen typed nodes in a networkx DiGraph, identified by a content key.

A node says what it computes (``op``, ``dtype``, a shape of sympy expressions, sorted ``attrs``);
edges carry an ``arg`` index giving argument order. Passes never mutate: ``Program.replace_node``
and friends return a new program. ``program_key`` is a Merkle hash over the nodes in a fixed
topological order, so equal programs have equal keys regardless of node ids or insertion order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from sparsec.formats.base import SYM
from sparsec.ir.ops import Op
from sparsec.lazy import lazy_module

nx = lazy_module("networkx")  # loaded by the first graph built (lowering), not by import sparsec
sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec

__all__ = ["SYM", "Node", "Program", "ProgramBuilder", "make_node", "node_keys", "program_key"]


@dataclass(frozen=True, slots=True)
class Node:
    op: Op
    dtype: str  # "fp16" | "bf16" | "fp32" | "fp64" | "i64" ...
    shape: tuple[sympy.Expr, ...]
    attrs: tuple[tuple[str, Any], ...] = ()  # sorted by key

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)

    def with_attrs(self, **changes: Any) -> Node:
        merged = {**dict(self.attrs), **changes}
        return dataclasses.replace(self, attrs=tuple(sorted(merged.items())))


def make_node(op: Op, dtype: str, shape, **attrs: Any) -> Node:
    return Node(op, dtype, tuple(sympy.sympify(s) for s in shape), tuple(sorted(attrs.items())))


@dataclass(frozen=True)
class Program:
    """One program of a sparse layer (forward, grad_input, grad_values, grow_scores)."""

    name: str
    graph: nx.DiGraph  # node id -> {"node": Node}; edge u -> v with {"arg": index}

    def node(self, nid: int) -> Node:
        return self.graph.nodes[nid]["node"]

    def args(self, nid: int) -> list[int]:
        preds = self.graph.in_edges(nid, data="arg")
        return [u for u, _, _ in sorted(preds, key=lambda e: e[2])]

    def order(self) -> list[int]:
        """A deterministic topological order (ties broken by node content, not by id)."""
        keys = node_keys(self)
        return list(nx.lexicographical_topological_sort(self.graph, key=lambda n: keys[n]))

    def find(self, op: Op) -> list[int]:
        return [n for n in self.order() if self.node(n).op is op]

    def outputs(self) -> dict[str, int]:
        return {self.node(n).attr("name"): n for n in self.find(Op.OUTPUT)}

    def replace_node(self, nid: int, node: Node) -> Program:
        graph = self.graph.copy()
        graph.nodes[nid]["node"] = node
        return Program(self.name, graph)

    def bypass(self, nid: int) -> Program:
        """Remove a one-argument-through node: its users read its first argument instead."""
        graph = self.graph.copy()
        source = self.args(nid)[0]
        for _, user, arg in list(graph.out_edges(nid, data="arg")):
            graph.add_edge(source, user, arg=arg)
        graph.remove_node(nid)
        return Program(self.name, graph)


class ProgramBuilder:
    def __init__(self, name: str):
        self.name = name
        self.graph = nx.DiGraph()

    def add(self, node: Node, *args: int) -> int:
        nid = self.graph.number_of_nodes()
        self.graph.add_node(nid, node=node)
        for i, a in enumerate(args):
            self.graph.add_edge(a, nid, arg=i)
        return nid

    def build(self) -> Program:
        return Program(self.name, self.graph)


def _node_text(node: Node) -> str:
    shape = ",".join(sympy.srepr(s) for s in node.shape)
    attrs = ";".join(f"{k}={v!r}" for k, v in node.attrs)
    return f"{node.op.value}|{node.dtype}|{shape}|{attrs}"


def node_keys(program: Program) -> dict[int, str]:
    """Merkle key of every node: its own content and its arguments' keys in argument order."""
    keys: dict[int, str] = {}
    for nid in nx.topological_sort(program.graph):  # any order works: keys depend only on content
        parts = [_node_text(program.node(nid)), *(keys[a] for a in program.args(nid))]
        keys[nid] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return keys


def program_key(program: Program) -> str:
    """Content key of a program: its name and the keys of its outputs."""
    keys = node_keys(program)
    outs = sorted(keys[n] for n in program.graph if program.node(n).op is Op.OUTPUT)
    return hashlib.sha256("\n".join([program.name, *outs]).encode()).hexdigest()
