"""check_constraints: the spec's divisibility rules, written symbolically and explained in user terms."""

from __future__ import annotations

import sympy

from sparsec.ir.graph import IN, OUT, Program
from sparsec.ir.ops import Op
from sparsec.spec import NM, Block, FanIn, check_layer, parse_spec


def constraints_for(spec) -> list[tuple[str, sympy.Expr]]:
    """(rule, expression that must be zero or true) in terms of OUT and IN."""
    if isinstance(spec, NM):
        return [(f"I % {spec.m} == 0", sympy.Mod(IN, spec.m))]
    if isinstance(spec, Block):
        return [
            (f"O % {spec.rows} == 0", sympy.Mod(OUT, spec.rows)),
            (f"I % {spec.cols} == 0", sympy.Mod(IN, spec.cols)),
        ]
    if isinstance(spec, FanIn) and spec.k is not None:
        return [(f"{spec.k} <= I", sympy.Le(spec.k, IN))]
    return []


def check_constraints(program: Program) -> Program:
    """Evaluate the rules for the program's shape; a violation raises ``ShapeError`` naming the fix."""
    for nid in program.find(Op.SPARSE):
        node = program.node(nid)
        spec = parse_spec(node.attr("spec"))
        out, inn = node.attr("out_features"), node.attr("in_features")
        rules = constraints_for(spec)
        for _, expr in rules:
            value = expr.subs({OUT: out, IN: inn})
            if value not in (0, sympy.true):
                check_layer(spec, out, inn, f"{program.name} program")  # the user-facing message
        program = program.replace_node(nid, node.with_attrs(constraints=tuple(rule for rule, _ in rules)))
    return program
