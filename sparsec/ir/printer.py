"""A stable text form of a program: same program, same text (ids renumbered in key order)."""

from __future__ import annotations

from sparsec.ir.graph import Program
from sparsec.spec import SPEC_TYPES


def _value(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, SPEC_TYPES):
        return repr(str(v))  # quoted: a spec's own commas would read as attribute separators
    return repr(v) if isinstance(v, str) else str(v)


def print_program(program: Program) -> str:
    order = program.order()
    local = {nid: i for i, nid in enumerate(order)}
    lines = [f"program {program.name}"]
    for nid in order:
        node = program.node(nid)
        args = ", ".join(f"%{local[a]}" for a in program.args(nid))
        shape = ", ".join(str(s) for s in node.shape)
        attrs = ", ".join(f"{k}={_value(v)}" for k, v in node.attrs)
        lines.append(
            f"  %{local[nid]} = {node.op.value}({args}) : {node.dtype}[{shape}]" + (f" {{{attrs}}}" if attrs else "")
        )
    return "\n".join(lines)
