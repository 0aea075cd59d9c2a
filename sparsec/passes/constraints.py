"""check_constraints: the spec's divisibility rules, written symbolically and explained in user terms."""

from __future__ import annotations

from sparsec.formats import check_layer, format_of
from sparsec.ir.graph import SYM, Program
from sparsec.ir.ops import Op
from sparsec.lazy import lazy_module

sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec


def check_constraints(program: Program) -> Program:
    """Evaluate the format's rules for the program's shape; a violation raises ``ShapeError`` naming the fix."""
    for nid in program.find(Op.SPARSE):
        node = program.node(nid)
        spec = node.attr("spec")
        out, inn = node.attr("out_features"), node.attr("in_features")
        rules = format_of(spec).constraints(spec)
        for _, expr in rules:
            value = expr.subs({SYM.OUT: out, SYM.IN: inn})
            if value not in (0, sympy.true):
                check_layer(spec, out, inn, f"{program.name} program")  # the user-facing message
        program = program.replace_node(nid, node.with_attrs(constraints=tuple(rule for rule, _ in rules)))
    return program
