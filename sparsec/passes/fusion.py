"""fuse_epilogue: fold ADD_BIAS and ACTIVATION that follow an SPMM into the SPMM's epilogue."""

from __future__ import annotations

from sparsec.ir.graph import Program
from sparsec.ir.ops import Op


def _single_user(program: Program, nid: int, op: Op) -> int | None:
    users = list(program.graph.successors(nid))
    return users[0] if len(users) == 1 and program.node(users[0]).op is op else None


def fuse_epilogue(program: Program) -> Program:
    """Y + b and act(Y) are computed on the accumulator before the store: one kernel, no extra pass."""
    for spmm in program.find(Op.SPMM):
        add = _single_user(program, spmm, Op.ADD_BIAS)
        if add is not None:
            bias = program.args(add)[1]
            graph = program.graph.copy()
            graph.add_edge(bias, spmm, arg=2)
            program = type(program)(program.name, graph).bypass(add)
            program = program.replace_node(spmm, program.node(spmm).with_attrs(bias=True))
        act = _single_user(program, spmm, Op.ACTIVATION)
        if act is not None:
            fn = program.node(act).attr("fn")
            program = program.bypass(act)
            program = program.replace_node(spmm, program.node(spmm).with_attrs(activation=fn))
    return program
